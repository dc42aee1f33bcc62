// What the /dev/loopN integration tests (two-caches, loop-device, budget-loop) share: the test's
// scratch directory, the loop devices it attached and the filesystems it mounted, all let go after
// each test (unmounted first, then detached, then the scratch directory removed), and sha256 of a
// file or device.
import { createHash } from 'node:crypto';
import { closeSync, mkdirSync, openSync, readSync } from 'node:fs';
import { afterEach } from 'vitest';
import { mustSh, scratch, sh, ulobdev } from './cli.js';

export type Scratch = ReturnType<typeof scratch>;

export interface LoopFixture {
  /** The current test's scratch directory (set by `scratch`). */
  readonly s: Scratch;
  /** Makes the test's scratch directory (removed after the test). */
  scratch(prefix: string): Scratch;
  /** `loop` is attached: detached after the test unless `detached` says it went already. */
  attached(loop: string): void;
  /** `loop` was detached by the test itself. */
  detached(loop: string): void;
  /** Mounts `dev` on `dir` (made if missing); unmounted after the test unless `umount` did it. */
  mount(dev: string, dir: string, opts?: string[]): void;
  /** Unmounts `dir`; throws if umount fails. */
  umount(dir: string): void;
}

/**
 * The fixture of a test file, with its afterEach registered: every mount is let go (umount, errors
 * ignored), then every device still attached (`ulobdev detach`), then the scratch directory.
 */
export function useLoopFixture(): LoopFixture {
  let current: Scratch | undefined;
  let devices: string[] = [];
  const mounts: string[] = [];
  afterEach(async () => {
    for (const m of mounts.splice(0)) sh('umount', [m]);
    for (const dev of devices.splice(0)) await ulobdev(['detach', dev, '--run-dir', current!.runDir]);
    current?.cleanup();
  });
  return {
    get s() {
      if (!current) throw new Error('no scratch directory yet: call scratch() first');
      return current;
    },
    scratch(prefix) {
      current = scratch(prefix);
      return current;
    },
    attached(loop) {
      devices.push(loop);
    },
    detached(loop) {
      devices = devices.filter((d) => d !== loop);
    },
    mount(dev, dir, opts = []) {
      mkdirSync(dir, { recursive: true });
      mustSh('mount', [...opts, dev, dir]);
      mounts.push(dir);
    },
    umount(dir) {
      mustSh('umount', [dir]);
      mounts.splice(mounts.indexOf(dir), 1);
    },
  };
}

/** sha256 (hex) of a file or block device, read 8 MiB at a time. */
export function shaOf(path: string): string {
  const h = createHash('sha256');
  const fd = openSync(path, 'r');
  const buf = Buffer.allocUnsafe(8 << 20);
  try {
    for (;;) {
      const n = readSync(fd, buf, 0, buf.byteLength, null);
      if (n === 0) break;
      h.update(buf.subarray(0, n));
    }
  } finally {
    closeSync(fd);
  }
  return h.digest('hex');
}
