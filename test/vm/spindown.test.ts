// Disk power on an emulated ATA disk (QEMU's PIIX IDE, libata in the guest): DiskPower finds the
// SG_IO ATA pass-through, CHECK POWER MODE and STANDBY IMMEDIATE are sent and accepted, the
// HDIO_DRIVE_CMD fallback takes the same commands; and `ulobdev --writeback --spindown` over that
// disk writes the dirty data back on `flush --wait` and then sends it STANDBY IMMEDIATE.
//
// What QEMU can show: its IDE emulation (hw/ide/core.c) accepts STANDBY IMMEDIATE as a no-op and
// answers every CHECK POWER MODE with count 0xff ("active or idle"), so the disk never *reads* as
// standby here. The test asserts exactly that, and that the daemon believes the disk rather than
// the command: it reads the state back, reports the disk still active, warns once and records a
// 'standby-ignored' event (no false spin-up later), plus the bytes on the disk image.
import { createHash, randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { prepareVm, ROOT, runInVm, type VmResult } from '../support/vm.js';

const DISK_BYTES = 32 << 20;
const DATA_OFFSET = 3 << 20;
let dir: string;
let disk: string;
let data: Buffer;
let run: VmResult;

// Runs in the guest: `node power.mjs /dev/sdX` prints one POWER {...} line.
const powerScript = `
import { openSync, constants as c } from 'node:fs';
import { DiskPower, ataPassThrough16, decodeAtaReturn, ATA } from '${ROOT}/dist/writeback/power.js';
import { ataSgIo, hdioDriveCmd } from '${ROOT}/dist/native/power.js';
const dev = process.argv[2];
const warnings = [];
const logger = { warn: (m) => warnings.push(m), info() {}, error() {}, debug() {} };
const out = { dev, warnings };
const p = await DiskPower.open(dev, logger);
out.transport = p.transport;
out.before = await p.state();
await p.standby();
out.standby = 'accepted';
out.after = await p.state();
await p.close();
const fd = openSync(dev, c.O_RDONLY | c.O_NONBLOCK);
// The raw registers of CHECK POWER MODE through SG_IO, and both commands through HDIO_DRIVE_CMD
// (which libata turns into its own pass-through): [status, error, count].
const sense = Buffer.alloc(64);
const r = await ataSgIo(fd, ataPassThrough16({ command: ATA.CHECK_POWER_MODE }), sense, 30000);
out.sgioCheck = decodeAtaReturn(sense, r.senseLength);
const hdio = async (command) => { const a = Buffer.from([command, 0, 0, 0]); await hdioDriveCmd(fd, a); return [a[0], a[1], a[2]]; };
out.hdioStandby = await hdio(ATA.STANDBY_IMMEDIATE);
out.hdioCheck = await hdio(ATA.CHECK_POWER_MODE);
console.log('POWER ' + JSON.stringify(out));
`;

beforeAll(async () => {
  prepareVm();
  mkdirSync(join(ROOT, '.vm', 'run'), { recursive: true });
  dir = mkdtempSync(join(ROOT, '.vm', 'run', 'spindown-'));
  disk = join(dir, 'ata.img');
  writeFileSync(disk, Buffer.alloc(DISK_BYTES));
  data = randomBytes(2 << 20);
  run = await runInVm(
    `
    U="node ${ROOT}/dist/cli/ulobdev.bundle.js"
    modprobe ata_piix; modprobe sd_mod; modprobe loop; modprobe fuse
    D=
    for i in 1 2 3 4 5 6 7 8 9 10; do
      for b in /sys/block/sd*; do
        [ -e "$b/device/model" ] && grep -q "QEMU HARDDISK" "$b/device/model" && D=/dev/\${b##*/}
      done
      [ -n "$D" ] && break; sleep 1
    done
    [ -n "$D" ] || { echo "no QEMU HARDDISK"; ls /sys/block; exit 1; }
    echo "ATA disk $D: $(cat /sys/block/\${D#/dev/}/device/vendor) $(cat /sys/block/\${D#/dev/}/device/model)"
    node /mnt/power.mjs $D

    $U --writeback --spindown -c /tmp/c.cache -b /tmp/c.bitmap --daemon /dev/loop0 $D
    dd if=/mnt/data.bin of=/dev/loop0 bs=1M seek=${DATA_OFFSET >> 20} oflag=direct conv=fsync status=none
    echo "STATUS-BEFORE $($U status --json /dev/loop0 | tr -d '\\n')"
    $U flush --wait /dev/loop0 && echo "flush --wait done"
    echo "STATUS-AFTER $($U status --json /dev/loop0 | tr -d '\\n')"
    echo "REPORT $($U report --json /dev/loop0 | tr -d '\\n')"
    dd if=$D bs=1M skip=${DATA_OFFSET >> 20} count=2 iflag=direct status=none | cmp - /mnt/data.bin && echo "ATA disk holds the data"
    node /mnt/power.mjs $D | sed 's/^POWER /POWER-AFTER /'
    $U detach /dev/loop0 && echo detached
    cat /run/ulobdev/loop0.log
  `,
    { ataDisks: [disk], files: { 'power.mjs': powerScript, 'data.bin': data }, timeoutMs: 480_000 },
  );
}, 900_000);

afterAll(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

/** The JSON after `TAG ` on its own output line. */
function line(tag: string): any {
  const m = run.output.match(new RegExp(`^${tag} (.*)$`, 'm'));
  if (!m) throw new Error(`no ${tag} line in the guest's output:\n${run.output}`);
  return JSON.parse(m[1]!);
}

const ACTIVE_OR_IDLE = 0xff;

describe('disk power on an emulated ATA disk (QEMU PIIX IDE)', () => {
  it('the guest script ran to its end', () => {
    expect(run.code, run.output).toBe(0);
    expect(run.output).toMatch(/^ATA disk \/dev\/sd[a-z]: ATA +QEMU HARDDISK/m);
  });

  it('DiskPower uses SG_IO ATA pass-through; CHECK POWER MODE and STANDBY IMMEDIATE are accepted', () => {
    const p = line('POWER');
    expect(p.warnings).toEqual([]);
    expect(p.transport).toBe('sgio');
    expect(p.before).toBe('active');
    expect(p.standby).toBe('accepted');
    // QEMU answers 0xff whatever came before: after STANDBY IMMEDIATE the disk still reads active.
    expect(p.after).toBe('active');
    expect(p.sgioCheck.status & 0x01).toBe(0);
    expect(p.sgioCheck.count).toBe(ACTIVE_OR_IDLE);
  });

  it('HDIO_DRIVE_CMD, the fallback, takes the same commands', () => {
    const p = line('POWER');
    const [standbyStatus, standbyError] = p.hdioStandby;
    expect(standbyStatus & 0x01).toBe(0);
    expect(standbyError).toBe(0);
    const [checkStatus, checkError, checkCount] = p.hdioCheck;
    expect(checkStatus & 0x01).toBe(0);
    expect(checkError).toBe(0);
    expect(checkCount).toBe(ACTIVE_OR_IDLE);
  });

  it('ulobdev --spindown: flush --wait writes the data back, then sends STANDBY IMMEDIATE', () => {
    const before = line('STATUS-BEFORE');
    expect(before.frontend).toBe('loop');
    expect(before.dirtyBytes).toBe(data.byteLength);
    expect(before.writeback.powerControl).toBe('sgio');
    expect(before.writeback.powerState).toBe('active');
    expect(run.output).toMatch(/wrote 2 MiB back/);

    const after = line('STATUS-AFTER');
    expect(after.dirtyBytes).toBe(0);
    expect(after.flushEpoch).toBe(before.flushEpoch + 1);
    expect(after.writeback.lastFlushBytes).toBe(data.byteLength);
    // STANDBY IMMEDIATE was accepted, but the daemon read the state back (QEMU: still active)
    // and reports what the disk says, not what the command promised.
    expect(after.writeback.powerState).toBe('active');
    expect(after.writeback.lastError).toBeNull();
    expect(run.output).toMatch(/accepted STANDBY IMMEDIATE but still reports itself active/);

    const report = line('REPORT');
    expect(report.flushes).toHaveLength(1);
    const [flush] = report.flushes;
    expect(flush).toMatchObject({ bytes: data.byteLength, blocks: data.byteLength / 4096, spunUp: false, error: null });
    const standby = report.events.filter((e: { kind: string }) => e.kind === 'standby-ignored');
    expect(standby).toHaveLength(1);
    expect(standby[0].detail).toBe('after flush');
    expect(standby[0].at).toBeGreaterThanOrEqual(flush.endedAt);

    expect(line('POWER-AFTER').after).toBe('active');
    expect(run.output).toContain('ATA disk holds the data');
    expect(run.output).toMatch(/^detached$/m);
  });

  it('the disk image on the host holds the flushed data and nothing else', () => {
    const img = readFileSync(disk);
    const expected = Buffer.alloc(DISK_BYTES);
    data.copy(expected, DATA_OFFSET);
    const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
    expect(sha(img)).toBe(sha(expected));
  });
});
