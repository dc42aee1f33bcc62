// A filesystem far larger than the machine's disk, for tests of 16 and 64 TiB backing disks and
// their disk-sized caches: XFS on a loop device over a sparse file, twice. The host filesystem
// (ext4 here) caps a file at 16 TiB - 4 KiB, so the outer XFS is that size and holds a sparse
// inner image of any size, whose XFS takes the big sparse backing files and the fallocate()d
// caches (unwritten extents: metadata only). Real space used: tens of MiB.
import { mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { mustSh, sh } from './cli.js';

/** ext4's largest file with 4 KiB blocks: 2^32 - 1 blocks. */
const OUTER_BYTES = 2 ** 44 - 4096;

export interface ThinXfs {
  /** Mount point of the big filesystem. */
  dir: string;
  /** Unmounts both levels and frees their loop devices (safe to call twice). */
  cleanup(): void;
}

/** A thin XFS of `bytes` mounted under `base` (a scratch directory the caller removes). */
export function thinXfs(base: string, bytes: number): ThinXfs {
  const undo: Array<() => void> = [];
  const cleanup = () => {
    for (const step of undo.splice(0).reverse()) step();
  };
  try {
    const outer = level(join(base, 'outer.img'), OUTER_BYTES, join(base, 'outer'), undo);
    const dir = level(join(outer, 'inner.img'), bytes, join(base, 'big'), undo);
    return { dir, cleanup };
  } catch (err) {
    cleanup();
    throw err;
  }
}

function level(image: string, bytes: number, mountPoint: string, undo: Array<() => void>): string {
  mustSh('truncate', ['-s', String(bytes), image]);
  undo.push(() => rmSync(image, { force: true }));
  const loop = mustSh('losetup', ['-f', '--show', image]).trim();
  undo.push(() => void sh('losetup', ['-d', loop]));
  // -K: no discard of the whole device; a 64 MiB log instead of the 2 GiB mkfs would zero.
  mustSh('mkfs.xfs', ['-q', '-f', '-K', '-l', 'size=64m', loop]);
  mkdirSync(mountPoint, { recursive: true });
  mustSh('mount', [loop, mountPoint]);
  undo.push(() => {
    const r = sh('umount', [mountPoint]);
    if (r.status !== 0) sh('umount', ['-l', mountPoint]);
  });
  return mountPoint;
}
