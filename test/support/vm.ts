// The VM harness: boots one of Debian's kernels (6.1, 6.12 or the newest 7.x) in qemu (software
// emulation) with the host's root read-only as the guest's root, runs one shell script there and
// returns its output and exit status. scripts/vm/prepare.sh installs and caches everything under
// .vm/ first. Every run fails on a kernel splat (BUG, WARNING, Oops, KASAN, lockdep, UBSAN, KFENCE,
// hung task, ...) in the guest's kernel log: a test that passes its own assertions over a warning
// in the module is not passing.
import { execFileSync, spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync, existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { expect } from 'vitest';

export const ROOT = resolve(import.meta.dirname, '../..');

/**
 * A guest kernel: Debian 12's 6.1, Debian 13's 6.12 or the newest in trixie-backports (7.x).
 * The exact version of each is pinned in .vm/kernels/SERIES on first use.
 */
export type KernelSeries = '6.1' | '6.12' | 'newest';
export const KERNEL_SERIES: readonly KernelSeries[] = ['6.1', '6.12', 'newest'];

/**
 * The kernel a VM test runs on unless it names one: $ULOBVM_KERNEL (6.1, 6.12, newest; `make
 * test-kernels` sets it for each in turn), else 6.12, Debian 13's.
 */
export function defaultKernel(): KernelSeries {
  const k = process.env.ULOBVM_KERNEL;
  if (k === undefined || k === '') return '6.12';
  if (k === '7' || k === '7.x') return 'newest';
  if (!(KERNEL_SERIES as readonly string[]).includes(k)) throw new Error(`ULOBVM_KERNEL=${k}: use one of ${KERNEL_SERIES.join(', ')}`);
  return k as KernelSeries;
}

export interface VmPaths {
  SERIES: KernelSeries;
  /** `uname -r` of the guest, e.g. 6.12.118+deb13-amd64. */
  KVER: string;
  KERNEL: string;
  INITRD: string;
  MODULES: string;
  /** uloop.ko built for this kernel (in .vm/k/KVER/uloop). */
  ULOOP_KO: string;
  ULOOPCTL: string;
  LOG_REPLAY: string;
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
  /** Kernel splats found in dmesg or on the console (see findSplats); empty on a clean run. */
  splats: string[];
  /** The kernel the guest ran. */
  kernel: VmPaths;
  /** Wall time from spawning qemu to its exit. */
  ms: number;
  timedOut: boolean;
}

export interface RunOptions {
  /** Which kernel to boot (default: defaultKernel()). */
  kernel?: KernelSeries;
  /** Wall time before qemu is killed (default 480 s: a loaded 2-core host slows TCG guests several-fold). */
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
  /**
   * Splat lines this run provokes on purpose (matched against each line findSplats reports); any
   * other splat still fails the run. Use sparingly and say why at the call site.
   */
  allowSplats?: RegExp;
  /** Extra kernel command line arguments. */
  append?: string;
}

/** Thrown by runInVm when the guest's kernel log shows a splat. */
export class GuestKernelSplatError extends Error {
  readonly code = 'EGUESTSPLAT';
  constructor(
    readonly result: VmResult,
    readonly lines: string[],
  ) {
    super(`guest kernel ${result.kernel.KVER} logged ${lines.length} splat line(s):\n${lines.join('\n')}`);
  }
}

/**
 * Lines of a kernel log that mean the kernel found a bug: BUG:/kernel BUG at (also KFENCE, soft
 * lockups, sleeping in atomic context), WARNING: (WARN_ON, lockdep's "WARNING: possible circular
 * locking dependency", suspicious RCU usage), Oops, general protection faults, KASAN/UBSAN/KFENCE
 * reports, list corruption (CONFIG_DEBUG_LIST, on in Debian's kernels), hung tasks and panics.
 * Exported for the harness's own test.
 */
export function findSplats(log: string): string[] {
  const splat =
    /\bBUG[: ]|kernel BUG at|\bWARNING:|\bOops\b|general protection fault|\bKASAN\b|\bUBSAN\b|\bKFENCE\b|possible (circular|recursive) locking|inconsistent lock state|lock held when returning|list_(add|del) corruption|slab_out_of_bounds|use-after-free|blocked for more than \d+ seconds|Kernel panic|RCU detected stall|rcu_.*self-detected stall|Call Trace:/;
  const out: string[] = [];
  for (const raw of log.split('\n')) {
    const line = raw.replace(/\r$/, '');
    if (splat.test(line) && !out.includes(line)) out.push(line);
  }
  return out;
}

/**
 * The splat lines of a run that `allowSplats` (RunOptions.allowSplats) does not declare: runInVm
 * rejects with GuestKernelSplatError when there is any. Exported for the harness's own test.
 */
export function unexpectedSplats(result: Pick<VmResult, 'splats'>, allowSplats?: RegExp): string[] {
  return result.splats.filter((l) => !allowSplats?.test(l));
}

/**
 * Thrown by runInVm (checkBundleFresh) when a script runs dist/cli/ulobdev.bundle.js and that is
 * missing or older than the compiled modules it bundles.
 */
export class StaleBundleError extends Error {
  readonly code = 'ESTALEBUNDLE';
  constructor(detail: string) {
    super(`${detail}: run \`make build\` (it bundles dist/cli/ulobdev.js into dist/cli/ulobdev.bundle.js) before the VM tests`);
  }
}

/** The newest mtime (ms) of the .js files under dir (recursively), but `skip`. */
function newestJs(dir: string, skip: string): number {
  let newest = 0;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) newest = Math.max(newest, newestJs(p, skip));
    else if (e.name.endsWith('.js') && p !== skip) newest = Math.max(newest, statSync(p).mtimeMs);
  }
  return newest;
}

/**
 * Throws StaleBundleError when ROOT/dist/cli/ulobdev.bundle.js is missing or older than any other
 * .js file under ROOT/dist/ (a `tsc` without `make build`): the VM files run the bundle (one file a
 * Node start loads instead of ~210 over the guest's 9p root: docs/design.md, "Start time"), and a
 * stale one would test old code. `root`: the project directory (default ROOT; the unit test's own).
 */
export function checkBundleFresh(root: string = ROOT): void {
  const bundle = join(root, 'dist/cli/ulobdev.bundle.js');
  if (!existsSync(bundle)) throw new StaleBundleError(`${bundle} is missing`);
  if (newestJs(join(root, 'dist'), bundle) > statSync(bundle).mtimeMs) throw new StaleBundleError(`${bundle} is older than the compiled modules under dist/`);
}

const prepared = new Map<KernelSeries, VmPaths>();

/**
 * Runs scripts/vm/prepare.sh for a kernel once per process (it is idempotent and cached across
 * processes under .vm/): downloads and unpacks the kernel, builds its initramfs and uloop.ko.
 * Throws (with prepare.sh's stderr shown) when any of that fails, e.g. uloop.c builds with warnings.
 */
export function prepareVm(kernel: KernelSeries = defaultKernel()): VmPaths {
  const done = prepared.get(kernel);
  if (done) return done;
  const out = execFileSync('bash', [join(ROOT, 'scripts/vm/prepare.sh'), kernel], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], timeout: 900_000 });
  const vars = Object.fromEntries(out.split('\n').filter((l) => l.includes('=')).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
  const paths = vars as unknown as VmPaths;
  prepared.set(kernel, paths);
  return paths;
}

/**
 * Boots the VM, runs `script` (sh, cwd /mnt, the scratch export) as root, powers off.
 * Resolves with the result when the guest kernel logged no splat (whatever the script's exit
 * status: the caller asserts on that); rejects with GuestKernelSplatError otherwise.
 */
export async function runInVm(script: string, options: RunOptions = {}): Promise<VmResult> {
  if (script.includes('dist/cli/ulobdev.bundle.js')) checkBundleFresh();
  const paths = prepareVm(options.kernel ?? defaultKernel());
  const base = join(ROOT, '.vm', 'run');
  mkdirSync(base, { recursive: true });
  const scratch = mkdtempSync(join(base, 'r-'));
  // The guest's / is the host's, read-only over 9p: /var/lib/ulobdev/disks (the disk records,
  // written at every write-back attach) cannot be made there; the guest's /tmp is its own tmpfs.
  const body = `set -e\nexport ULOBDEV_STATE_DIR=/tmp/ulobdev-state\n${script}\n`;
  if (process.env.ULOBVM_TRACE) {
    // A time profile of the script (scripts/vm/trace-summary.mjs reads it): bash instead of sh, its
    // xtrace with the guest's clock into /tmp (not over 9p at every line), copied to the scratch
    // directory as trace.log at the end. Only for measuring: bash is not the sh the tests run under.
    // (bash ignores a PS4 from the environment when run as root: set in the script.)
    writeFileSync(join(scratch, 'body.sh'), `exec 9>/tmp/.ulobvm-trace; BASH_XTRACEFD=9; PS4='+\${EPOCHREALTIME} '; set -x\n${body}`);
    writeFileSync(join(scratch, 'cmd.sh'), `bash /mnt/body.sh\nrc=$?\ncp /tmp/.ulobvm-trace /mnt/trace.log\nexit $rc\n`);
  } else writeFileSync(join(scratch, 'cmd.sh'), body);
  for (const [name, data] of Object.entries(options.files ?? {})) writeFileSync(join(scratch, name), data);

  // kfence.sample_interval: Debian 13 builds KFENCE in but off (interval 0); a sampled guard-page
  // check of slab objects costs nothing measurable and catches out-of-bounds and use-after-free.
  const append = `console=ttyS0 panic=-1 loglevel=4 kfence.sample_interval=10 ulobvm.modules=${paths.MODULES} ulobvm.project=${ROOT}${options.append ? ` ${options.append}` : ''}`;
  // Single-threaded TCG: with one host thread per vCPU (qemu 7.2's default), Debian 13's kernels
  // sometimes die at boot with "Oops: int3" in sched_clock_cpu (about 1 boot in 15 here): a vCPU
  // runs code that another is live-patching with text_poke_bp (static keys), which multi-threaded
  // TCG does not keep coherent. Round-robin vCPUs on one thread never saw it (0 in 20 boots, +13%).
  const args = [
    '-accel', 'tcg,thread=single', '-cpu', 'max', '-smp', String(options.cpus ?? 2), '-m', String(options.memoryMb ?? 1024),
    '-nographic', '-no-reboot', '-monitor', 'none',
    '-kernel', paths.KERNEL, '-initrd', paths.INITRD,
    '-append', append,
    '-virtfs', 'local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap',
    '-virtfs', `local,path=${scratch},mount_tag=scratch,security_model=none`,
  ];
  (options.ataDisks ?? []).forEach((file, i) => {
    if (i > 1) throw new Error('runInVm: at most 2 ATA disks');
    args.push('-drive', `file=${file},if=none,id=ata${i},format=raw`, '-device', `ide-hd,drive=ata${i},bus=ide.0,unit=${i}`);
  });
  const started = Date.now();
  let readyAt = 0;
  const boot = async (): Promise<{ consoleText: string; timedOut: boolean }> => {
    // setpriv --pdeathsig: the guest dies with the test process, however that ends (a vitest time
    // limit, Ctrl-C, a killed run), instead of running on as an orphan on a shared machine.
    const qemu = spawn('setpriv', ['--pdeathsig', 'KILL', 'qemu-system-x86_64', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let consoleText = '';
    qemu.stdout.setEncoding('utf8').on('data', (s: string) => {
      consoleText += s;
      if (readyAt === 0 && consoleText.includes('ULOBVM_READY')) readyAt = Date.now();
      if (process.env.ULOBVM_VERBOSE) process.stderr.write(s);
    });
    qemu.stderr.setEncoding('utf8').on('data', (s: string) => (consoleText += s));
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      qemu.kill('SIGKILL');
    }, options.timeoutMs ?? 480_000);
    await new Promise<void>((r) => qemu.on('close', () => r()));
    clearTimeout(timer);
    return { consoleText, timedOut };
  };
  let { consoleText, timedOut } = await boot();
  // A guest that died before init printed ULOBVM_READY never ran the test's script: nothing of
  // ours was loaded (only the kernel and its virtio/9p modules). TCG under load has shown such
  // boot-time deaths (a double fault in proc_caches_init at 0.56 s, kbud10 in session 10), so
  // that boot is said on stderr and the guest booted once more; a second such death fails.
  if (!timedOut && !consoleText.includes('ULOBVM_READY') && !existsSync(join(scratch, 'rc'))) {
    process.stderr.write(`--- VM boot on ${paths.KVER} died before the test's script ran; booting once more. Its console: ---\n${consoleText.replace(/\r/g, '').slice(-4000)}\n`);
    ({ consoleText, timedOut } = await boot());
  }
  const ms = Date.now() - started;
  if (process.env.ULOBVM_TRACE && existsSync(join(scratch, 'trace.log'))) {
    const dir = resolve(process.env.ULOBVM_TRACE);
    mkdirSync(dir, { recursive: true });
    const to = join(dir, `trace-${started}.log`);
    writeFileSync(to, readFileSync(join(scratch, 'trace.log')));
    process.stderr.write(`--- VM run: boot ${readyAt - started} ms, script and poweroff ${Date.now() - readyAt} ms; xtrace in ${to}\n`);
  }

  const read = (name: string): string => (existsSync(join(scratch, name)) ? readFileSync(join(scratch, name), 'utf8') : '');
  const rcText = read('rc').trim();
  const dmesg = read('dmesg.log');
  const consoleClean = consoleText.replace(/\r/g, '');
  const result: VmResult = {
    code: rcText === '' ? null : Number(rcText),
    output: read('out.log'),
    console: consoleClean,
    dmesg,
    splats: findSplats(`${dmesg}\n${consoleClean}`),
    kernel: paths,
    ms,
    timedOut,
  };
  const unexpected = unexpectedSplats(result, options.allowSplats);
  if (result.code !== 0 || unexpected.length > 0) {
    process.stderr.write(
      `--- VM run on ${paths.KVER} failed (exit ${String(result.code)}${timedOut ? ', timed out' : ''}${unexpected.length ? `, ${unexpected.length} kernel splat line(s)` : ''}, ${ms} ms, scratch ${scratch}) ---\n` +
        `--- script output ---\n${result.output}\n--- guest kernel log ---\n${result.dmesg || result.console}\n`,
    );
  }
  if (!options.keep && result.code === 0 && unexpected.length === 0) rmSync(scratch, { recursive: true, force: true });
  if (unexpected.length > 0) throw new GuestKernelSplatError(result, unexpected);
  return result;
}

/**
 * Splats of a starved host, which VM tests may pass to runInVm as allowSplats: soft lockups, with
 * the bare "Call Trace:" line of their register dump. Seen on 6.12 with the host at load 10-15: single-threaded
 * TCG runs both vCPUs on one host thread, and when the host deschedules it for 20-60 s the guest's
 * clock jumps past the watchdog's threshold; one boot logged five, in idle (pv_native_safe_halt),
 * in initcalls (jitterentropy, chr_dev_init), in a kworker clearing pages for the initramfs and in
 * migration/1, all minutes before uloop.ko was loaded (the boot took 500 s). expectCleanKernel
 * still fails on a soft lockup logged once uloop.ko is loaded, and every BUG/WARNING/lockdep/
 * hung-task/KASAN/KFENCE/RCU-stall line fails the run as before.
 */
export const TCG_STARVATION = /soft lockup - CPU#\d+ stuck for \d+s!|^\[[ \d.]+\] Call Trace:$/;

/**
 * Fails the test when the guest never finished (crash, timeout) or logged a kernel splat: any
 * other than TCG_STARVATION, and a soft lockup too once uloop.ko was loaded. runInVm already
 * rejects a run with any other splat; this states it at the assertion too.
 */
export function expectCleanKernel(run: VmResult): void {
  expect(run.dmesg, 'the guest wrote no kernel log (it crashed or timed out)').not.toBe('');
  expect(
    run.splats.filter((l) => !TCG_STARVATION.test(l)),
    'kernel splats in the guest log',
  ).toEqual([]);
  const lines = run.dmesg.split('\n');
  const loaded = lines.findIndex((l) => /\buloop\b/.test(l));
  const after = loaded < 0 ? [] : lines.slice(loaded).filter((l) => /soft lockup - CPU#/.test(l));
  expect(after, 'soft lockups once uloop.ko was loaded').toEqual([]);
}
