// A real Debian 13 boot with systemd as PID 1 (its own root disk, Debian's 6.12 kernel and
// initramfs; test/support/boot-vm.ts), an emulated ATA disk playing the hard disk, and the .deb
// set up exactly as docs/laptop.md says (test/vm/systemd-boot.step.sh, once per boot). One qemu
// run of two boots (each boot of Debian under TCG costs over a minute, each start of the daemon
// half of one): install and set up, write, kill -9 the daemon and watch systemd bring it back,
// write again, reboot; then check the mount at boot, that the files are read from flash, and the
// flush at the reboot, and power off. The disk image is read on the host at the end (debugfs): it
// holds every file.
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { execFileSync } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bootMachine, makeBootMachine, removeBootMachine, scratchFile, type BootMachine, type BootRun } from '../support/boot-vm.js';
import { buildDeb } from '../support/deb.js';

let m: BootMachine | undefined;
let run: BootRun;
const boot: string[] = [];

beforeAll(async () => {
  const deb = buildDeb();
  m = makeBootMachine({ hardDiskBytes: 256 << 20 });
  const step = readFileSync(join(import.meta.dirname, 'systemd-boot.step.sh'));
  // A hung step is cut short by the lack of progress (no console output, no step log line for
  // stallMs), not by the overall limit.
  run = await bootMachine(m, { timeoutMs: 1_200_000, stallMs: 400_000, files: { 'ulobdev.deb': readFileSync(deb), 'step.sh': step } });
  boot[1] = scratchFile(m, 'boot-1.log');
  boot[2] = scratchFile(m, 'boot-2.log');
  for (const [i, log] of boot.entries()) if (log !== undefined) process.stderr.write(`--- boot ${i} ---\n${log}\n`);
  process.stderr.write(`qemu run: ${run.ms} ms${run.stalled ? ' (stalled)' : ''}\n`);
}, 1_500_000);

afterAll(() => removeBootMachine(m));

/** The value after `KEY ` on its own line of boot N's log. */
function value(n: number, key: string): string {
  const line = boot[n]!.split('\n').find((l) => l.startsWith(`${key} `));
  if (line === undefined) throw new Error(`no ${key} line in boot ${n}'s log:\n${boot[n]}\n--- console ---\n${run?.console.slice(-4000)}`);
  return line.slice(key.length + 1);
}

function status(n: number, key: string): Record<string, any> {
  return JSON.parse(value(n, key));
}

/** The unit's journal lines of the boot before boot N (as the step script printed them). */
function journal(n: number, of: number): string[] {
  const log = boot[n]!;
  const from = log.indexOf(`JOURNAL-BEGIN ${of}\n`);
  const to = log.indexOf(`JOURNAL-END ${of}`);
  expect(from, `journal of boot ${of} in boot ${n}'s log`).toBeGreaterThanOrEqual(0);
  return log.slice(from + `JOURNAL-BEGIN ${of}\n`.length, to).split('\n').filter(Boolean);
}

/** A log line's message (the daemon logs JSON; systemd's own lines are plain). */
function message(line: string): string {
  try {
    return String((JSON.parse(line) as { msg: unknown }).msg);
  } catch {
    return line;
  }
}

const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

describe('Debian 13 under systemd, set up as docs/laptop.md says', () => {
  it('boots Debian 13 with systemd as PID 1 on its own disk, twice, and every step ran', () => {
    expect(run.timedOut, run.console.slice(-3000)).toBe(false);
    for (const n of [1, 2]) {
      expect(boot[n], `boot ${n} log`).toMatch(new RegExp(`^BOOT ${n}$`, 'm'));
      expect(boot[n]).not.toMatch(/STEP-FAILED/);
      expect(value(n, 'PID1')).toBe('systemd');
      expect(value(n, 'KERNEL')).toMatch(/^6\.12\./);
      expect(Number(value(n, 'UPTIME'))).toBeGreaterThan(0);
    }
    expect(value(1, 'INSTALLED')).toMatch(/^\d+\.\d+\.\d+/);
    expect(boot[1]).toMatch(/^OLD-READ ok$/m);
  });

  it('mounts the filesystem through the cache at boot, by its stable name', () => {
    const src = value(2, 'MOUNT-SOURCE');
    expect(src).toMatch(/^\/dev\/loop\d+$/);
    expect(value(2, 'STABLE-NAME')).toBe(src);
    expect(value(2, 'BACKING')).toBe('/run/ulobdev/data/fuse/disk');
    expect(value(2, 'ACTIVE')).toBe('active active');
  });

  it('data written before the reboot is on flash after it: read back without a read of the disk', () => {
    expect(boot[2]).toMatch(/^FILES-READ ok$/m);
    expect(Number(value(2, 'DISK-SECTORS-READ'))).toBe(0);
  });

  it('flushed at the reboot (the schedule implies flush at stop): what was dirty went to the disk', () => {
    const lines = journal(2, 1).map(message);
    // b.bin was written just before the reboot; QEMU's disk never sleeps, so the daemon may also
    // have flushed some of it opportunistically first. The stop wrote the rest: nothing stays dirty.
    const detached = lines.filter((l) => l.startsWith('detached:')).pop();
    expect(detached).toMatch(/^detached: wrote \d+(\.\d+)? (B|KiB|MiB) back; nothing stays dirty$/);
    expect(status(1, 'STATUS2')).toMatchObject({ name: 'data' });
    expect(status(2, 'STATUS3')).toMatchObject({ name: 'data' });
  });

  it('the journal carries one readable line per event', () => {
    const lines = journal(2, 1);
    // systemd's own lines and the daemon's: one line each, the daemon's with a message.
    expect(lines.some((l) => /^Started ulobdev@data\.service/.test(l) || /Started .*ulobdev flash cache data/.test(l))).toBe(true);
    const msgs = lines.map(message);
    expect(msgs).toContain('attached');
    expect(msgs.some((m) => m.startsWith('detached:'))).toBe(true);
    expect(lines.every((l) => !l.includes('\n'))).toBe(true);
  });

  it('kill -9 of the daemon: systemd restarts it, refused while the dead device is mounted, then re-attached under the same name', () => {
    // Still mounted on the dead device: each restart refuses in one line until it is unmounted.
    if (value(1, 'MOUNTED-AFTER-KILL') === 'yes') expect(Number(value(1, 'REFUSED-WHILE-MOUNTED'))).toBeGreaterThanOrEqual(1);
    expect(value(1, 'RESTARTS')).toMatch(/^\d+ active$/);
    expect(Number(value(1, 'RESTARTS').split(' ')[0])).toBeGreaterThanOrEqual(1);
    expect(boot[1]).toMatch(/^RESTARTED ok$/m);
    const after = status(1, 'STATUS-AFTER-KILL');
    expect(after.name).toBe('data');
    expect(value(1, 'STABLE-NAME-AFTER-KILL')).toBe(after.device);
    // The restart took the cache back; no attempt failed on what the dead daemon left.
    const lines = boot[1]!.split('\n').filter((l) => l.startsWith('AFTER-KILL ')).map((l) => message(l.slice('AFTER-KILL '.length)));
    expect(lines.some((l) => /not closed cleanly last time; recovered its dirty set/.test(l))).toBe(true);
    expect(lines.filter((l) => /failed/.test(l) && !/Failed with result 'signal'/.test(l))).toEqual([]);
    expect(boot[1]).toMatch(/^A-READ-AFTER-KILL ok$/m);
  });

  it('the disk image holds every file (read on the host, without the cache)', () => {
    const dump = (name: string) => {
      const out = join(m!.dir, name);
      execFileSync('debugfs', ['-R', `dump /${name} ${out}`, m!.hardDisk], { stdio: 'pipe' });
      return readFileSync(out);
    };
    for (const name of ['old.bin', 'a.bin', 'b.bin']) {
      const want = scratchFile(m!, `${name.split('.')[0]}.sha`).split(' ')[0];
      expect(sha(dump(name)), name).toBe(want);
    }
  });
});
