// The VM harness: boots Debian's 6.1 kernel in qemu (software emulation) with the host's root
// read-only as the guest's root, runs one shell script there and returns its output and exit
// status. scripts/vm/prepare.sh installs and caches everything under .vm/ first.
import { execFileSync, spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync, existsSync } from 'node:fs';
import { join, resolve } from 'node:path';

export const ROOT = resolve(import.meta.dirname, '../..');

export interface VmPaths {
  KVER: string;
  KERNEL: string;
  INITRD: string;
  MODULES: string;
  ULOOP_KO: string;
  ULOOPCTL: string;
}

export interface VmResult {
  /** Exit status of the script, or null when the guest never reported one (crash, timeout). */
  code: number | null;
  /** The script's stdout and stderr, interleaved. */
  output: string;
  /** The serial console: kernel messages that reached it and the init's markers. */
  console: string;
  /** The guest's kernel log at the end of the run (empty if the guest did not get that far). */
  dmesg: string;
  /** Wall time from spawning qemu to its exit. */
  ms: number;
  timedOut: boolean;
}

export interface RunOptions {
  timeoutMs?: number;
  memoryMb?: number;
  cpus?: number;
  /** Extra files placed in the scratch directory (the guest's /mnt) before boot. */
  files?: Record<string, string | Uint8Array>;
  /** Keep the scratch directory (its path is printed) for a look after the run. */
  keep?: boolean;
  /**
   * Raw image files attached as emulated ATA disks on the PIIX IDE controller's first channel
   * (ide.0 master, slave; ide.1 holds the default CD drive): the guest sees "QEMU HARDDISK"s
   * after `modprobe ata_piix sd_mod`.
   */
  ataDisks?: string[];
}

let prepared: VmPaths | undefined;

/** Runs scripts/vm/prepare.sh once per process (it is idempotent and cached across processes). */
export function prepareVm(): VmPaths {
  if (prepared) return prepared;
  const out = execFileSync('bash', [join(ROOT, 'scripts/vm/prepare.sh')], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], timeout: 600_000 });
  const vars = Object.fromEntries(out.split('\n').filter((l) => l.includes('=')).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
  prepared = vars as unknown as VmPaths;
  return prepared;
}

/** Boots the VM, runs `script` (sh, cwd /mnt, the scratch export) as root, powers off. */
export async function runInVm(script: string, options: RunOptions = {}): Promise<VmResult> {
  const paths = prepareVm();
  const base = join(ROOT, '.vm', 'run');
  mkdirSync(base, { recursive: true });
  const scratch = mkdtempSync(join(base, 'r-'));
  writeFileSync(join(scratch, 'cmd.sh'), `set -e\n${script}\n`);
  for (const [name, data] of Object.entries(options.files ?? {})) writeFileSync(join(scratch, name), data);

  const args = [
    '-accel', 'tcg', '-cpu', 'max', '-smp', String(options.cpus ?? 2), '-m', String(options.memoryMb ?? 1024),
    '-nographic', '-no-reboot', '-monitor', 'none',
    '-kernel', paths.KERNEL, '-initrd', paths.INITRD,
    '-append', `console=ttyS0 panic=-1 loglevel=4 ulobvm.modules=${paths.MODULES} ulobvm.project=${ROOT}`,
    '-virtfs', 'local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap',
    '-virtfs', `local,path=${scratch},mount_tag=scratch,security_model=none`,
  ];
  (options.ataDisks ?? []).forEach((file, i) => {
    if (i > 1) throw new Error('runInVm: at most 2 ATA disks');
    args.push('-drive', `file=${file},if=none,id=ata${i},format=raw`, '-device', `ide-hd,drive=ata${i},bus=ide.0,unit=${i}`);
  });
  const started = Date.now();
  const qemu = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let consoleText = '';
  qemu.stdout.setEncoding('utf8').on('data', (s: string) => {
    consoleText += s;
    if (process.env.ULOBVM_VERBOSE) process.stderr.write(s);
  });
  qemu.stderr.setEncoding('utf8').on('data', (s: string) => (consoleText += s));
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    qemu.kill('SIGKILL');
  }, options.timeoutMs ?? 240_000);
  await new Promise<void>((r) => qemu.on('close', () => r()));
  clearTimeout(timer);
  const ms = Date.now() - started;

  const read = (name: string): string => (existsSync(join(scratch, name)) ? readFileSync(join(scratch, name), 'utf8') : '');
  const rcText = read('rc').trim();
  const result: VmResult = {
    code: rcText === '' ? null : Number(rcText),
    output: read('out.log'),
    console: consoleText.replace(/\r/g, ''),
    dmesg: read('dmesg.log'),
    ms,
    timedOut,
  };
  if (result.code !== 0) {
    process.stderr.write(
      `--- VM run failed (exit ${String(result.code)}${timedOut ? ', timed out' : ''}, ${ms} ms, scratch ${scratch}) ---\n` +
        `--- script output ---\n${result.output}\n--- guest kernel log ---\n${result.dmesg || result.console}\n`,
    );
  }
  if (!options.keep && result.code === 0) rmSync(scratch, { recursive: true, force: true });
  return result;
}
