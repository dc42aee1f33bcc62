// A Debian 13 VM that boots for real: its own root disk (a qcow2 overlay of the cached ext4 image
// of scripts/vm/boot-image.sh), Debian's kernel (the 6.12 of test/vm's harness, so its uloop.ko
// loads) and initramfs, systemd as PID 1, and a second disk on
// the emulated IDE controller that plays the hard disk. The test's steps run as a oneshot unit
// (ulobvm-step.service) from a 9p share of a scratch directory: /mnt/scratch/step.sh, run once per
// boot; it may reboot the guest (same qemu process) or power it off (qemu exits). Unlike
// test/vm's harness, nothing of the host is visible to the guest but the scratch share.
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { prepareVm, type VmPaths } from './vm.js';

export const ROOT = resolve(import.meta.dirname, '../..');

export interface BootImage {
  ROOTFS: string;
  /** The cached root disk image (ext4 of ROOTFS); runs boot an overlay of it. */
  IMAGE: string;
  KVER: string;
  KERNEL: string;
  INITRD: string;
}

let image: BootImage | undefined;

/**
 * Makes (once, cached in .vm/trixie-boot and .vm/trixie-boot.img, keyed by the script and the
 * kernel) the Debian 13 root with systemd and its kernel: the 6.12 that scripts/vm/prepare.sh
 * pins and builds uloop.ko for (returned as `kernel`).
 */
export function prepareBootImage(): BootImage & { kernel: VmPaths } {
  const kernel = prepareVm('6.12');
  if (image) return { ...image, kernel };
  const out = execFileSync('bash', [join(ROOT, 'scripts/vm/boot-image.sh')], {
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'inherit'],
    timeout: 1_200_000,
    env: { ...process.env, BOOT_KVER: kernel.KVER },
  });
  image = Object.fromEntries(out.split('\n').filter((l) => l.includes('=')).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)])) as unknown as BootImage;
  return { ...image, kernel };
}

/** The machine a test boots, possibly several times: its disks and scratch directory persist. */
export interface BootMachine {
  dir: string;
  /** The root disk: a qcow2 overlay of the cached image. */
  rootDisk: string;
  /** The "hard disk": a raw image on the IDE controller, /dev/disk/by-id/ata-QEMU_HARDDISK_<HDD_SERIAL>. */
  hardDisk: string;
  /** Every hard disk: hardDisks[i] is /dev/disk/by-id/ata-QEMU_HARDDISK_ULOBHDD<i+1> (hardDisks[0] is hardDisk). */
  hardDisks: string[];
  /** Shared with the guest as /mnt/scratch. */
  scratch: string;
  image: BootImage & { kernel: VmPaths };
}

export const HDD_SERIAL = 'ULOBHDD1';
/** The serial of hard disk i (0-based): ULOBHDD1, ULOBHDD2, ... */
export const hddSerial = (i: number) => `ULOBHDD${i + 1}`;

/**
 * A new machine: a root disk that is a qcow2 overlay of the cached image (nothing is copied; the
 * image stays clean) and an empty hard disk of `hardDiskBytes`, `hardDisks` of them (at most 4,
 * the IDE controller's units; 1 by default).
 */
export function makeBootMachine(options: { hardDiskBytes: number; hardDisks?: number }): BootMachine {
  const img = prepareBootImage();
  const base = join(ROOT, '.vm', 'run');
  mkdirSync(base, { recursive: true });
  const dir = mkdtempSync(join(base, 'boot-'));
  const rootDisk = join(dir, 'root.qcow2');
  const hardDisks = Array.from({ length: options.hardDisks ?? 1 }, (_, i) => join(dir, i === 0 ? 'hdd.img' : `hdd${i + 1}.img`));
  const scratch = join(dir, 'scratch');
  mkdirSync(scratch);
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', img.IMAGE, '-F', 'raw', rootDisk], { stdio: 'pipe' });
  for (const d of hardDisks) execFileSync('truncate', ['-s', String(options.hardDiskBytes), d]);
  return { dir, rootDisk, hardDisk: hardDisks[0]!, hardDisks, scratch, image: img };
}

export interface BootRun {
  /** The serial console: kernel and systemd messages, and the steps' output (journal+console). */
  console: string;
  /** qemu's exit status; null when killed at the timeout. */
  code: number | null;
  timedOut: boolean;
  /** Killed because nothing progressed for stallMs (timedOut is then true too). */
  stalled: boolean;
  /** Killed because the guest asked for an unclean reset (the `killOn` file appeared). */
  killed: boolean;
  ms: number;
}

/** Bytes in the scratch directory's files: the step's log lines show its progress. */
function scratchBytes(dir: string): number {
  let n = 0;
  for (const name of readdirSync(dir)) n += statSync(join(dir, name)).size;
  return n;
}

/**
 * Boots the machine and waits for qemu to exit (a poweroff in the guest), at most `timeoutMs`, and
 * no longer than `stallMs` without progress (console output or a step's log growing in the scratch
 * directory). Reboots inside the guest stay in this run. `files` are written into the scratch
 * directory first. `killOn`: when the guest creates that file in the scratch directory, qemu is
 * killed (SIGKILL): the machine loses power, nothing in the guest gets to sync or unmount.
 */
export async function bootMachine(
  m: BootMachine,
  options: { timeoutMs: number; stallMs?: number; files?: Record<string, string | Uint8Array>; memoryMb?: number; killOn?: string },
): Promise<BootRun> {
  for (const [name, data] of Object.entries(options.files ?? {})) writeFileSync(join(m.scratch, name), data);
  const append = ['root=/dev/vda', 'rw', 'console=ttyS0', 'panic=-1', 'quiet', 'systemd.show_status=auto', 'net.ifnames=0'].join(' ');
  // Single-threaded TCG, as test/vm's harness: Debian 13's kernels can Oops at boot in multi-threaded TCG.
  const args = [
    '-accel', 'tcg,thread=single', '-cpu', 'max', '-smp', '2', '-m', String(options.memoryMb ?? 1536),
    '-nographic', '-monitor', 'none', '-nic', 'none',
    '-kernel', m.image.KERNEL, '-initrd', m.image.INITRD, '-append', append,
    '-drive', `file=${m.rootDisk},if=virtio,format=qcow2`,
    ...m.hardDisks.flatMap((d, i) => ['-drive', `file=${d},if=none,id=hdd${i},format=raw`, '-device', `ide-hd,drive=hdd${i},bus=ide.${i >> 1},unit=${i & 1},serial=${hddSerial(i)}`]),
    '-virtfs', `local,path=${m.scratch},mount_tag=scratch,security_model=none`,
  ];
  const started = Date.now();
  // setpriv --pdeathsig: the guest dies with the test process, however that ends (a vitest time
  // limit, Ctrl-C, a killed run), instead of running on as an orphan on a shared machine.
  const qemu = spawn('setpriv', ['--pdeathsig', 'KILL', 'qemu-system-x86_64', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let text = '';
  const onData = (s: string) => {
    text += s;
    if (process.env.ULOBVM_VERBOSE) process.stderr.write(s);
  };
  qemu.stdout.setEncoding('utf8').on('data', onData);
  qemu.stderr.setEncoding('utf8').on('data', onData);
  let timedOut = false;
  let stalled = false;
  let killed = false;
  const timer = setTimeout(() => {
    timedOut = true;
    qemu.kill('SIGKILL');
  }, options.timeoutMs);
  let seen = -1;
  let progressAt = Date.now();
  const killer = setInterval(() => {
    if (options.killOn !== undefined && !killed && existsSync(join(m.scratch, options.killOn))) {
      killed = true;
      qemu.kill('SIGKILL');
    }
  }, 200);
  const watchdog = setInterval(() => {
    const now = text.length + scratchBytes(m.scratch);
    if (now !== seen) {
      seen = now;
      progressAt = Date.now();
    } else if (options.stallMs !== undefined && Date.now() - progressAt > options.stallMs) {
      timedOut = stalled = true;
      qemu.kill('SIGKILL');
    }
  }, 5000);
  const code = await new Promise<number | null>((r) => qemu.on('close', (c) => r(c)));
  clearTimeout(timer);
  clearInterval(watchdog);
  clearInterval(killer);
  const run = { console: text.replace(/\r/g, ''), code, timedOut, stalled, killed, ms: Date.now() - started };
  writeFileSync(join(m.dir, `console-${started}.log`), run.console);
  return run;
}

/** A file the guest wrote into the scratch directory ('' when absent). */
export function scratchFile(m: BootMachine, name: string): string {
  const p = join(m.scratch, name);
  return existsSync(p) ? readFileSync(p, 'utf8') : '';
}

/** Removes the machine's directory unless ULOBVM_KEEP is set (then says where it is). */
export function removeBootMachine(m: BootMachine | undefined): void {
  if (!m) return;
  if (process.env.ULOBVM_KEEP) {
    process.stderr.write(`boot VM kept in ${m.dir}: ${readdirSync(m.dir).join(' ')}\n`);
    return;
  }
  rmSync(m.dir, { recursive: true, force: true });
}
