// DKMS and module loading as on a Debian 13 laptop. scripts/vm/dkms.sh runs `dkms add/build/install`
// for the guest's kernel in the Debian 13 build root, and `dkms autoinstall` for a second kernel
// (what a kernel upgrade runs; it builds only modules with AUTOINSTALL=yes). The guest then gets that
// DKMS-built, DKMS-signed module in /lib/modules/KVER/updates/dkms (an overlay on the read-only
// module tree; its modules.dep index made by depmod on the host, see below), and:
//  - `ulobdev --writeback /dev/uloop0 ...` with no module loaded runs `modprobe uloop` itself and
//    attaches (the DKMS module serves reads and writes);
//  - with signature enforcement on (module.sig_enforce, what Secure Boot turns on) and DKMS's MOK
//    key not enrolled, the kernel refuses the module and ulobdev says so in one line that points
//    to mokutil and docs/laptop.md, exit 1, nothing attached.
// DKMS for Debian 12's 6.1 is Debian 12's own dkms and gcc-12 on the host; this test covers the
// Debian 13 kernels (6.12 and 7.x) and is skipped on 6.1. The second kernel (its preparation and
// the autoinstall) is done on the host while the guest runs: the guest needs only its own module.
import { execFile, execFileSync } from 'node:child_process';
import { copyFileSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { basename, join } from 'node:path';
import { promisify } from 'node:util';
import { beforeAll, describe, expect, it } from 'vitest';
import { defaultKernel, prepareVm, ROOT, runInVm, type VmResult } from '../support/vm.js';

const execFileP = promisify(execFile);

/**
 * scripts/vm/prepare.sh for the other kernel (as prepareVm, but without blocking the event loop
 * that reads the guest's console), then `dkms.sh --autoinstall` for it; resolves with its KVER and
 * the dkms.sh output, or with the error (never rejects: it is awaited only after the guest run).
 */
async function autoinstallOther(series: 'newest' | '6.12'): Promise<{ kver: string; out: string } | { error: unknown }> {
  try {
    const prep = await execFileP('bash', [`${ROOT}/scripts/vm/prepare.sh`, series], { encoding: 'utf8', timeout: 900_000, maxBuffer: 64 << 20 });
    process.stderr.write(prep.stderr);
    const kver = /^KVER=(.*)$/m.exec(prep.stdout)?.[1];
    if (!kver) throw new Error(`prepare.sh ${series} printed no KVER=:\n${prep.stdout}`);
    const r = await execFileP('bash', [`${ROOT}/scripts/vm/dkms.sh`, '--autoinstall', kver], { encoding: 'utf8', timeout: 600_000, maxBuffer: 64 << 20 });
    process.stderr.write(r.stderr);
    return { kver, out: r.stdout };
  } catch (error) {
    return { error };
  }
}

const kernel = defaultKernel();
let run: VmResult;
let dkms: Record<string, string>;
let status: string[];

describe.skipIf(kernel === '6.1')(`DKMS and modprobe on ${kernel}`, () => {
  beforeAll(async () => {
    const vm = prepareVm(kernel);
    const out = execFileSync('bash', [`${ROOT}/scripts/vm/dkms.sh`, vm.KVER], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], timeout: 600_000 });
    dkms = Object.fromEntries(out.split('\n').filter((l) => /^DKMS_\w+=/.test(l)).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
    const other = autoinstallOther(kernel === 'newest' ? '6.12' : 'newest');
    // The module index (modules.dep and the rest) for the guest's module tree with the DKMS module
    // in updates/dkms, made by depmod on the host (the guest runs the host's own kmod: its root is
    // the host's): depmod -a in the guest read the 4,230 xz-compressed modules over 9p under TCG,
    // 127 s of a 182 s guest run. The guest copies the index in where depmod -a would write it.
    // The other kernel's DKMS build runs on the host meanwhile: awaited before a failure here is
    // thrown, so that it never outlives this file holding .vm/.lock.
    try {
      // .vm/run is made by runInVm, which has not run yet in this file (a fresh .vm has none).
      mkdirSync(join(ROOT, '.vm', 'run'), { recursive: true });
      const dep = mkdtempSync(join(ROOT, '.vm', 'run', 'depmod-'));
      try {
        const tree = join(dep, 'root', 'lib', 'modules');
        mkdirSync(tree, { recursive: true });
        mkdirSync(join(dep, 'upper'));
        mkdirSync(join(dep, 'work'));
        execFileSync('mount', ['-t', 'overlay', 'overlay', '-o', `lowerdir=${vm.MODULES},upperdir=${join(dep, 'upper')},workdir=${join(dep, 'work')}`, tree]);
        try {
          mkdirSync(join(tree, vm.KVER, 'updates', 'dkms'), { recursive: true });
          copyFileSync(dkms.DKMS_KO!, join(tree, vm.KVER, 'updates', 'dkms', basename(dkms.DKMS_KO!)));
          execFileSync('depmod', ['-b', join(dep, 'root'), vm.KVER], { stdio: 'pipe' });
        } finally {
          execFileSync('umount', [tree]);
        }
        const index = join(dep, 'upper', vm.KVER);
        // "T LABEL UPTIME" lines: where the guest's time goes (in the log below, for people).
        run = await runInVm(`
          t() { echo "T $1 $(cut -d' ' -f1 /proc/uptime)"; }
          t start
          U="node ${ROOT}/dist/cli/ulobdev.bundle.js"; K=$(uname -r); D=/dev/uloop0
          modprobe overlay; mkdir -p /tmp/mu /tmp/mw && mount -t overlay -o lowerdir=/lib/modules,upperdir=/tmp/mu,workdir=/tmp/mw overlay /lib/modules
          mkdir -p /lib/modules/$K/updates/dkms && cp ${dkms.DKMS_KO} /lib/modules/$K/updates/dkms/ && cp ${index}/modules.* /lib/modules/$K/
          t depmod
          echo "signer: $(modinfo -F signer uloop)"
          [ ! -e /dev/uloop-control ] && echo "no module loaded yet"
          head -c 4M /dev/urandom > /tmp/disk.img && truncate -s 32M /tmp/disk.img
          t attach
          $U -c /tmp/d.cache -b /tmp/d.bitmap --writeback --daemon $D /tmp/disk.img > /dev/null && echo attached
          t attached
          grep -q '^uloop ' /proc/modules && echo "loaded by the daemon"
          dd if=$D of=/tmp/r bs=1M count=4 iflag=direct status=none
          head -c 4M /tmp/disk.img | cmp - /tmp/r && echo "reads verified"
          t detach
          $U detach $D > /dev/null && rmmod uloop && echo unloaded
          t detached
          echo 1 > /sys/module/module/parameters/sig_enforce
          if $U -c /tmp/e.cache -b /tmp/e.bitmap --writeback --daemon $D /tmp/disk.img > /tmp/out 2> /tmp/err; then echo "attached an unenrolled module"; fi
          t refused
          echo "refusal: $(cat /tmp/err)"
          echo "refusal lines: $(wc -l < /tmp/err)"
          [ ! -e /dev/uloop-control ] && [ ! -e /tmp/e.cache ] && echo "nothing attached, no cache made"
        `);
      } finally {
        rmSync(dep, { recursive: true, force: true });
      }
    } catch (err) {
      await other;
      throw err;
    }
    process.stderr.write(`VM run: ${run.ms} ms\n${run.output.split('\n').filter((l) => l.startsWith('T ')).join('\n')}\n`);
    const second = await other;
    if ('error' in second) throw second.error;
    status = second.out.split('\n').filter((l) => l.startsWith('STATUS=')).map((l) => l.slice(7));
    expect(status).toContain(`uloop/0.1.0, ${vm.KVER}, x86_64: installed`);
    expect(status).toContain(`uloop/0.1.0, ${second.kver}, x86_64: installed`);
  }, 900_000);

  it('dkms add/build/install builds and signs uloop.ko for the guest kernel, autoinstall for the next one', () => {
    expect(dkms.DKMS_KO).toMatch(/uloop\.ko/);
    expect(run.output).toContain('signer: DKMS module signing key');
  });

  it('ulobdev loads the installed module with modprobe when /dev/uloop-control is missing', () => {
    expect(run.output).toContain('no module loaded yet');
    expect(run.output).toContain('attached');
    expect(run.output).toContain('loaded by the daemon');
    expect(run.output).toContain('reads verified');
    expect(run.output).toContain('unloaded');
  });

  it('a module refused for its signature gets one line naming the cause and the doc, and nothing attaches', () => {
    expect(run.output).not.toContain('attached an unenrolled module');
    expect(run.output).toMatch(/refusal: ulobdev: \/dev\/uloop0: the kernel refused uloop\.ko \(Key was rejected by service.*mokutil --import.*docs\/laptop\.md/);
    expect(run.output).toContain('refusal lines: 1');
    expect(run.output).toContain('nothing attached, no cache made');
    expect(run.code).toBe(0);
  });
});
