// DKMS and module loading as on a Debian 13 laptop. scripts/vm/dkms.sh runs `dkms add/build/install`
// for the guest's kernel in the Debian 13 build root, and `dkms autoinstall` for a second kernel
// (what a kernel upgrade runs; it builds only modules with AUTOINSTALL=yes). The guest then gets that
// DKMS-built, DKMS-signed module in /lib/modules/KVER/updates/dkms (an overlay on the read-only
// module tree), and:
//  - `ulobdev --writeback /dev/uloop0 ...` with no module loaded runs `modprobe uloop` itself and
//    attaches (the DKMS module serves reads and writes);
//  - with signature enforcement on (module.sig_enforce, what Secure Boot turns on) and DKMS's MOK
//    key not enrolled, the kernel refuses the module and ulobdev says so in one line that points
//    to mokutil and docs/laptop.md, exit 1, nothing attached.
// DKMS for Debian 12's 6.1 is Debian 12's own dkms and gcc-12 on the host; this test covers the
// Debian 13 kernels (6.12 and 7.x) and is skipped on 6.1.
import { execFileSync } from 'node:child_process';
import { beforeAll, describe, expect, it } from 'vitest';
import { defaultKernel, prepareVm, ROOT, runInVm, type VmResult } from '../support/vm.js';

const kernel = defaultKernel();
let run: VmResult;
let dkms: Record<string, string>;
let status: string[];

describe.skipIf(kernel === '6.1')(`DKMS and modprobe on ${kernel}`, () => {
  beforeAll(async () => {
    const vm = prepareVm(kernel);
    const other = prepareVm(kernel === 'newest' ? '6.12' : 'newest');
    const out = execFileSync('bash', [`${ROOT}/scripts/vm/dkms.sh`, vm.KVER, other.KVER], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], timeout: 600_000 });
    dkms = Object.fromEntries(out.split('\n').filter((l) => /^DKMS_\w+=/.test(l)).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
    status = out.split('\n').filter((l) => l.startsWith('STATUS=')).map((l) => l.slice(7));
    expect(status).toContain(`uloop/0.1.0, ${vm.KVER}, x86_64: installed`);
    expect(status).toContain(`uloop/0.1.0, ${other.KVER}, x86_64: installed`);
    run = await runInVm(`
      U="node ${ROOT}/dist/cli/ulobdev.bundle.js"; K=$(uname -r); D=/dev/uloop0
      modprobe overlay; mkdir -p /tmp/mu /tmp/mw && mount -t overlay -o lowerdir=/lib/modules,upperdir=/tmp/mu,workdir=/tmp/mw overlay /lib/modules
      mkdir -p /lib/modules/$K/updates/dkms && cp ${dkms.DKMS_KO} /lib/modules/$K/updates/dkms/ && depmod -a $K
      echo "signer: $(modinfo -F signer uloop)"
      [ ! -e /dev/uloop-control ] && echo "no module loaded yet"
      head -c 4M /dev/urandom > /tmp/disk.img && truncate -s 32M /tmp/disk.img
      $U -c /tmp/d.cache -b /tmp/d.bitmap --writeback --daemon $D /tmp/disk.img > /dev/null && echo attached
      grep -q '^uloop ' /proc/modules && echo "loaded by the daemon"
      dd if=$D of=/tmp/r bs=1M count=4 iflag=direct status=none
      head -c 4M /tmp/disk.img | cmp - /tmp/r && echo "reads verified"
      $U detach $D > /dev/null && rmmod uloop && echo unloaded
      echo 1 > /sys/module/module/parameters/sig_enforce
      if $U -c /tmp/e.cache -b /tmp/e.bitmap --writeback --daemon $D /tmp/disk.img > /tmp/out 2> /tmp/err; then echo "attached an unenrolled module"; fi
      echo "refusal: $(cat /tmp/err)"
      echo "refusal lines: $(wc -l < /tmp/err)"
      [ ! -e /dev/uloop-control ] && [ ! -e /tmp/e.cache ] && echo "nothing attached, no cache made"
    `);
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
