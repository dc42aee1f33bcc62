// The uloop control device's errnos (kernel/uloop.c) as errors that say what to do: each errno of
// open, ULOOP_IOC_ADD and ULOOP_IOC_ATTACH, as the addon throws it (NativeError); and the one line for
// /dev/ublkbN when the kernel's own ublk driver is missing.
import { constants } from 'node:os';
import { describe, expect, it } from 'vitest';
import { staleMount, ublkDriverMissing, ublkError } from '../../src/bdev/ublk.js';
import { uloopError } from '../../src/bdev/uloop-errors.js';
import { exitCodeFor } from '../../src/cli/exit-codes.js';
import {
  DeviceBusyError,
  InternalError,
  InvalidArgumentError,
  IOFailedError,
  ModuleMissingError,
  ModuleVersionError,
  PermissionDeniedError,
  UlobError,
} from '../../src/errors.js';
import { NativeError } from '../../src/native/addon.js';
import { ULOOP_ABI_VERSION } from '../../src/native/uloop.js';

const req = { device: '/dev/uloop3', size: 1000, blockSize: 4096, cache: '/var/lib/ulobdev/x.cache' };

function errno(code: keyof typeof constants.errno, syscall: string): NativeError {
  return new NativeError(`${code}: some text, ${syscall}`, code, constants.errno[code], syscall);
}

function expectTranslated(e: unknown, cls: abstract new (...a: never[]) => UlobError, says: RegExp[]): void {
  expect(e).toBeInstanceOf(cls);
  const msg = (e as Error).message;
  expect(msg).not.toMatch(/\n/);
  for (const re of says) expect(msg).toMatch(re);
}

describe('uloop errnos a user can act on', () => {
  it('open: no module, not root', () => {
    expectTranslated(uloopError('open', errno('ENOENT', 'open(/dev/uloop-control)'), req), ModuleMissingError, [/needs the uloop kernel module/, /insmod kernel\/uloop\.ko/]);
    expectTranslated(uloopError('open', errno('EACCES', 'open(/dev/uloop-control)'), req), PermissionDeniedError, [/\/dev\/uloop-control/, /run ulobdev as root/]);
  });

  it('ADD and ATTACH: a module of another ABI version says rebuild and reload', () => {
    for (const op of ['ADD', 'ATTACH'] as const) {
      const e = uloopError(op, errno('EPROTO', `ioctl(ULOOP_IOC_${op})`), req);
      expectTranslated(e, ModuleVersionError, [new RegExp(`another ABI than this ulobdev \\(version ${ULOOP_ABI_VERSION}\\)`), /make -C kernel/, /rmmod uloop/]);
      expect((e as UlobError).code).toBe('ULOB_E_MODULE_VERSION');
      expect((e as Error).cause).toMatchObject({ code: 'EPROTO' });
    }
  });

  it('ADD: /dev/uloopN taken says pick another, naming a free one', () => {
    for (const code of ['ENOSPC', 'EEXIST'] as const) {
      expectTranslated(uloopError('ADD', errno(code, 'ioctl(ULOOP_IOC_ADD)'), req), DeviceBusyError, [/\/dev\/uloop3 is taken/, /pick a free one, e\.g\. \/dev\/uloop\d+/]);
    }
  });

  it('ADD: EINVAL names what the module takes and what we sent', () => {
    expectTranslated(uloopError('ADD', errno('EINVAL', 'ioctl(ULOOP_IOC_ADD)'), req), InvalidArgumentError, [/multiple of 512 bytes \(1000\)/, /4 KiB to 1 MiB \(4096\)/, /x\.cache/, /dmesg/]);
  });

  it('ADD and ATTACH: privileges, a gone device, a second daemon', () => {
    expectTranslated(uloopError('ADD', errno('EPERM', 'ioctl(ULOOP_IOC_ADD)'), req), PermissionDeniedError, [/CAP_SYS_ADMIN/]);
    expectTranslated(uloopError('ATTACH', errno('ENODEV', 'ioctl(ULOOP_IOC_ATTACH)'), req), ModuleMissingError, [/\/dev\/uloop3 is gone/]);
    expectTranslated(uloopError('ATTACH', errno('EBUSY', 'ioctl(ULOOP_IOC_ATTACH)'), req), DeviceBusyError, [/another daemon serves \/dev\/uloop3/]);
    expect(uloopError('ADD', errno('EBUSY', 'ioctl(ULOOP_IOC_ADD)'), req)).toBeInstanceOf(InternalError);
  });

  it('anything else stays an I/O error naming the errno; refusals exit 1', () => {
    const e = uloopError('ADD', errno('ENOMEM', 'ioctl(ULOOP_IOC_ADD)'), req);
    expectTranslated(e, IOFailedError, [/ADD of \/dev\/uloop3: ENOMEM/]);
    expect(exitCodeFor(e)).toBe(74);
    for (const code of ['EPROTO', 'ENOSPC', 'EINVAL', 'EPERM'] as const) expect(exitCodeFor(uloopError('ADD', errno(code, 'ioctl'), req))).toBe(1);
    const plain = new TypeError('not from the kernel');
    expect(uloopError('ADD', plain, req)).toBe(plain);
  });
});

describe('/dev/ublkbN without the kernel ublk driver', () => {
  const notFound = { ok: false, status: 1, said: 'modprobe: FATAL: Module ublk_drv not found in directory /lib/modules/6.18.4-amd64' };

  it('on a kernel of 6.0 or later: the module to install and load, and what a kernel without CONFIG_BLK_DEV_UBLK means', () => {
    for (const kernel of ['6.18.4-amd64', '7.3.4+deb13-amd64', '6.0.0']) {
      const msg = ublkDriverMissing('/dev/ublkb0', kernel, notFound);
      expect(msg).not.toMatch(/\n/);
      expect(msg).toMatch(/^\/dev\/ublkb0 needs the kernel's ublk driver \(ublk_drv\), which kernel \S+ does not have as a module \(modprobe: FATAL: Module ublk_drv not found/);
      expect(msg).toContain(`linux-modules-extra-${kernel}`);
      expect(msg).toMatch(/run 'modprobe ublk_drv'; a kernel built without CONFIG_BLK_DEV_UBLK has no ublk: use \/dev\/loopN or \/dev\/nbdN instead$/);
      // Not the old "it is in Linux 6.0 and later", which read as "upgrade" on a 6.18 kernel.
      expect(msg).not.toMatch(/6\.0 and later/);
    }
  });

  it('on a kernel before 6.0: it has no ublk at all', () => {
    expect(ublkDriverMissing('/dev/ublkb1', '5.15.0-91-generic', notFound)).toBe(
      "/dev/ublkb1 needs the kernel's ublk driver (ublk_drv), which Linux added in 6.0; kernel 5.15.0-91-generic is older: use /dev/loopN or /dev/nbdN instead",
    );
  });

  it('a modprobe that fails otherwise is quoted; one that loads it without /dev/ublk-control says so', () => {
    const refused = ublkDriverMissing('/dev/ublkb0', '6.12.1', { ok: false, status: 1, said: "modprobe: ERROR: could not insert 'ublk_drv': Operation not permitted" });
    expect(refused).toBe(
      "/dev/ublkb0 needs the kernel's ublk driver (ublk_drv), and 'modprobe ublk_drv' failed (modprobe: ERROR: could not insert 'ublk_drv': Operation not permitted): fix what it says and try again, or use /dev/loopN or /dev/nbdN instead",
    );
    expect(ublkDriverMissing('/dev/ublkb0', '6.12.1', { ok: true, status: 0, said: '' })).toMatch(/'modprobe ublk_drv' loaded it but \/dev\/ublk-control did not appear \(see dmesg\)/);
  });
});

describe('/dev/ublkbN whose old device was deleted but is still held (EADDRINUSE at start)', () => {
  const inUse = Object.assign(new Error('EADDRINUSE: address already in use, ublk add'), { code: 'EADDRINUSE', errno: 98 });

  it('names every mount point of the device and its partitions, bind mounts included, in one line', async () => {
    const mountinfo = [
      '22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw',
      '90 22 259:3 / /a rw,relatime - ext4 /dev/ublkb0 rw',
      '91 22 259:3 / /b rw,relatime - ext4 /dev/ublkb0 rw',
      '92 22 259:4 / /c rw - xfs /dev/ublkb0p2 rw',
    ].join('\n');
    const err = await ublkError('/dev/ublkb0', inUse, mountinfo);
    expect(err).toBeInstanceOf(DeviceBusyError);
    expect(err.message).not.toMatch(/\n/);
    expect(err.message).toMatch(/^\/dev\/ublkb0 is still mounted at \/a, \/b, \/c \(.*\); unmount each, then run the same command again$/);
    // The preflight's refusal is the same line; one mount reads "unmount it".
    expect(staleMount('/dev/ublkb0', ['/tmp/m']).message).toMatch(/^\/dev\/ublkb0 is still mounted at \/tmp\/m \(.*\); unmount it, then run the same command again$/);
  });

  it('without a mount here, names the holders a sysadmin can check and the command that shows each', async () => {
    const err = await ublkError('/dev/ublkb3', inUse, '22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n');
    expect(err).toBeInstanceOf(DeviceBusyError);
    const msg = err.message;
    expect(msg).not.toMatch(/\n/);
    expect(msg).toMatch(/^\/dev\/ublkb3: its old device was deleted but something still holds it/);
    expect(msg).toContain('grep ublkb3 /proc/*/mountinfo');
    expect(msg).toContain('dmsetup ls --tree');
    expect(msg).toContain('swapon --show');
    expect(msg).toContain('ls -l /proc/*/fd | grep ublkb3');
    expect(msg).toMatch(/then run the same command again/);
  });
});
