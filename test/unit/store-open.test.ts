// Invariant 6 for the cache layer: CacheStore.open, CacheStore.discard and openBacking refuse bad
// input with one coded, one-line error that names what is wrong, and change nothing: every file
// in the cache's directory keeps its bytes and mtime, no file appears or disappears, and no file
// descriptor into it stays open. Real files in a temp dir; real loop devices and a real ext4 mount
// for the block-device cases.
import { createHash, randomBytes } from 'node:crypto';
import { execFileSync, spawn } from 'node:child_process';
import {
  closeSync,
  constants as fsc,
  mkdirSync,
  mkdtempSync,
  openSync,
  readFileSync,
  readdirSync,
  readlinkSync,
  rmSync,
  statSync,
  truncateSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import {
  CacheBusyError,
  CorruptMetadataError,
  DeviceBusyError,
  DirtyDataError,
  ForeignCacheError,
  IOFailedError,
  InvalidArgumentError,
  SizeMismatchError,
  UlobError,
} from '../../src/errors.js';
import { CacheEngine } from '../../src/cache/engine.js';
import { Geometry } from '../../src/cache/layout.js';
import { formatBytes } from '../../src/units.js';
import { CacheStore, type CachePaths } from '../../src/cache/store.js';
import { openBacking } from '../../src/source/backing.js';
import { posixStorage } from '../../src/storage/posix-storage.js';
import type { FileSource } from '../../src/source/file-source.js';
import { flushDirty } from '../../src/writeback/flusher.js';

const BS = 4096;
const BLOCKS = 64;
/** Not a whole number of blocks: the last block is short. */
const SIZE = BLOCKS * BS - 1000;

let dir: string;
let paths: CachePaths;
let disk: string;
/** Undone in reverse order after each test, whatever happened in it. */
let cleanups: (() => unknown)[] = [];

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'ulob-store-open-'));
  paths = { cache: join(dir, 'cache'), bitmap: join(dir, 'bitmap'), metadata: join(dir, 'cache.meta') };
  disk = join(dir, 'disk.img');
  writeFileSync(disk, randomBytes(SIZE));
});

afterEach(async () => {
  for (const undo of cleanups.reverse()) {
    try {
      await undo();
    } catch {
      // best effort: the next undo still runs
    }
  }
  cleanups = [];
  rmSync(dir, { recursive: true, force: true });
});

// --- helpers ------------------------------------------------------------------------------------

/** Opens the backing and the store as the daemon does; on refusal, closes what it opened. */
async function openCache(backingPath: string, options: { blockSize?: number; mode?: 'readonly' | 'writeback' } = {}) {
  const mode = options.mode ?? 'writeback';
  const source = await openBacking(backingPath, { writable: mode === 'writeback' });
  let store: CacheStore;
  try {
    store = await CacheStore.open({ paths, backing: source, mode, blockSize: options.blockSize });
  } catch (err) {
    await source.close();
    throw err;
  }
  cleanups.push(() => source.close());
  cleanups.push(() => store.close());
  return { store, source };
}

/** A cache of `disk` with some blocks present, and `dirtyBlocks` dirty ones; closed cleanly. */
async function makeCache(options: { dirtyBlocks?: number; blockSize?: number } = {}): Promise<void> {
  const source = await openBacking(disk, { writable: true });
  try {
    const store = await CacheStore.open({ paths, backing: source, mode: 'writeback', blockSize: options.blockSize ?? BS });
    const engine = new CacheEngine(store, source, { autoCommitMs: 0 });
    await engine.read(0, 8 * BS);
    for (let i = 0; i < (options.dirtyBlocks ?? 0); i++) await engine.write((20 + 2 * i) * BS, randomBytes(BS));
    await engine.close();
  } finally {
    await source.close();
  }
}

interface FileState {
  kind: 'file' | 'dir' | 'other';
  size: bigint;
  mtimeNs: bigint;
  sha256: string;
}

function hashFile(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

/**
 * Every entry of `d` (recursively) with its size, mtime and content hash. A directory is recorded by
 * its listing only: SQLite creates and removes a transient `-wal` file while it looks at a
 * database, which moves the directory's mtime but leaves nothing behind.
 */
function snapshot(d: string, extra: string[] = []): Map<string, FileState> {
  const out = new Map<string, FileState>();
  const walk = (p: string) => {
    const st = statSync(p, { bigint: true });
    const kind = st.isFile() ? 'file' : st.isDirectory() ? 'dir' : 'other';
    if (kind === 'dir') out.set(p, { kind, size: 0n, mtimeNs: 0n, sha256: readdirSync(p).sort().join('/') });
    else out.set(p, { kind, size: st.size, mtimeNs: st.mtimeNs, sha256: st.isFile() || st.isBlockDevice() ? hashFile(p) : '' });
    if (st.isDirectory()) for (const name of readdirSync(p).sort()) walk(join(p, name));
  };
  walk(d);
  for (const p of extra) walk(p);
  return out;
}

/** Targets of this process's open file descriptors that lie inside `d`. */
function fdsInto(d: string): string[] {
  const out: string[] = [];
  for (const fd of readdirSync('/proc/self/fd')) {
    try {
      const target = readlinkSync(`/proc/self/fd/${fd}`);
      if (target.startsWith(d + '/') || target === d) out.push(target);
    } catch {
      // the fd of the readdir itself, closed by now
    }
  }
  return out.sort();
}

type ErrorClass = abstract new (...args: never[]) => UlobError;

/**
 * Runs `action`, which must be refused with `cls`/`code` and a one-line message containing every
 * string in `mentions`, and checks that nothing in the cache's directory (nor in `extra`) changed
 * and that no descriptor into it was left open.
 */
async function expectRefused(
  action: () => Promise<unknown>,
  cls: ErrorClass,
  code: string,
  mentions: string[],
  extra: string[] = [],
  options: { checkFds?: boolean } = {},
): Promise<UlobError> {
  const before = snapshot(dir, extra);
  const fdsBefore = fdsInto(dir);
  const outcome = await action().then(
    (value) => ({ ok: true as const, value }),
    (error: unknown) => ({ ok: false as const, error }),
  );
  if (outcome.ok) {
    const v = outcome.value as { store?: CacheStore } | undefined;
    throw new Error(`expected ${cls.name} (${code}), but the call succeeded${v?.store ? ' and opened the cache' : ''}`);
  }
  const err = outcome.error;
  expect(err, String(err)).toBeInstanceOf(cls);
  const e = err as UlobError;
  expect(e.code).toBe(code);
  expect(e.name).toBe(cls.name);
  expect(e.message).not.toMatch(/[\r\n]/);
  expect(e.message.length).toBeGreaterThan(0);
  for (const m of mentions) expect(e.message).toContain(m);
  expect(snapshot(dir, extra)).toEqual(before);
  if (options.checkFds ?? true) expect(fdsInto(dir)).toEqual(fdsBefore);
  return e;
}

function ls(): string[] {
  return readdirSync(dir).sort();
}

/**
 * Another process holding the cache's metadata as a running ulobdev does (exclusive lock, WAL).
 * Returns a function that ends it (by its pid) and waits for it to exit.
 */
async function holdMetadataInAnotherProcess(metaPath: string): Promise<() => Promise<void>> {
  const script = `
    const Database = require('better-sqlite3');
    const db = new Database(process.argv[1], { fileMustExist: true });
    db.pragma('locking_mode = EXCLUSIVE');
    db.pragma('journal_mode = WAL');
    db.exec('BEGIN IMMEDIATE; COMMIT');
    process.stdout.write('locked\\n');
    process.stdin.resume();
    process.stdin.on('end', () => { db.close(); process.exit(0); });
  `;
  const child = spawn(process.execPath, ['-e', script, metaPath], { cwd: process.cwd(), stdio: ['pipe', 'pipe', 'inherit'] });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  await new Promise<void>((resolve, reject) => {
    child.stdout.once('data', () => resolve());
    child.once('exit', (code) => reject(new Error(`lock holder exited early (${code})`)));
  });
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) child.stdin.end();
    await exited;
  };
  cleanups.push(stop);
  return stop;
}

function losetup(file: string): string {
  return execFileSync('losetup', ['-f', '--show', file], { encoding: 'utf8' }).trim();
}

function detach(dev: string): void {
  execFileSync('losetup', ['-d', dev]);
}

// --- CacheStore.open ------------------------------------------------------------------------------

describe('CacheStore.open refuses a cache that is not this disk\'s, and changes nothing', () => {
  it('creates a cache when none exists, and reopens it (positive control)', async () => {
    expect(ls()).toEqual(['disk.img']);
    const { store } = await openCache(disk, { blockSize: BS });
    expect(ls()).toEqual(['bitmap', 'cache', 'cache.meta', 'cache.meta-reserve', 'cache.meta-wal', 'disk.img']);
    expect(statSync(paths.cache).size).toBe(BLOCKS * BS);
    expect(statSync(paths.bitmap).size).toBe(4096);
    const uuid = store.info.uuid;
    await store.close();
    expect(ls()).toEqual(['bitmap', 'cache', 'cache.meta', 'cache.meta-reserve', 'disk.img']);
    const again = await openCache(disk);
    expect(again.store.info.uuid).toBe(uuid);
    expect(again.store.recoveredFromCrash).toBe(false);
  });

  it('refuses the cache of another disk (identity differs)', async () => {
    await makeCache();
    const other = join(dir, 'other.img');
    writeFileSync(other, randomBytes(SIZE));
    await expectRefused(() => openCache(other), ForeignCacheError, 'ULOB_E_FOREIGN_CACHE', [paths.metadata, other]);
  });

  it('refuses a backing disk whose size changed', async () => {
    await makeCache();
    truncateSync(disk, SIZE + 3 * BS);
    await expectRefused(() => openCache(disk), SizeMismatchError, 'ULOB_E_SIZE_MISMATCH', [disk, String(SIZE + 3 * BS), String(SIZE)]);
  });

  it('refuses a block size other than the cache\'s', async () => {
    await makeCache({ blockSize: BS });
    await expectRefused(() => openCache(disk, { blockSize: 2 * BS }), SizeMismatchError, 'ULOB_E_SIZE_MISMATCH', [
      paths.metadata,
      String(BS),
      String(2 * BS),
    ]);
  });

  it('refuses an eviction unit other than the cache\'s, as a block size (newuser11 finding 8: it was ignored), and takes the same one', async () => {
    await makeCache({ blockSize: BS });
    const open = (evictionUnit: number) => async () => {
      const source = await openBacking(disk, { writable: true });
      try {
        const store = await CacheStore.open({ paths, backing: source, mode: 'writeback', evictionUnit });
        await store.close();
      } finally {
        await source.close();
      }
    };
    await expectRefused(open(1 << 20), SizeMismatchError, 'ULOB_E_SIZE_MISMATCH', [paths.metadata, '256 KiB eviction units, not 1 MiB', 'omit --eviction-unit']);
    await open(256 * 1024)();
  });

  it('refuses a cache file of the wrong size, smaller or larger', async () => {
    await makeCache();
    truncateSync(paths.cache, BLOCKS * BS - 4096);
    await expectRefused(() => openCache(disk), SizeMismatchError, 'ULOB_E_SIZE_MISMATCH', [paths.cache, String(BLOCKS * BS - 4096)]);
    truncateSync(paths.cache, BLOCKS * BS + 4096);
    await expectRefused(() => openCache(disk), SizeMismatchError, 'ULOB_E_SIZE_MISMATCH', [paths.cache, String(BLOCKS * BS + 4096)]);
  });

  it('refuses a bitmap file of the wrong size', async () => {
    await makeCache();
    truncateSync(paths.bitmap, 8192);
    await expectRefused(() => openCache(disk), SizeMismatchError, 'ULOB_E_SIZE_MISMATCH', [paths.bitmap, '8192', '4096']);
  });

  it('refuses a bitmap with bits set past the last block', async () => {
    await makeCache();
    const fd = openSync(paths.bitmap, 'r+');
    try {
      // Bit BLOCKS is the first one past the disk's last block.
      writeSync(fd, Buffer.from([1 << (BLOCKS & 7)]), 0, 1, BLOCKS >> 3);
    } finally {
      closeSync(fd);
    }
    await expectRefused(() => openCache(disk), CorruptMetadataError, 'ULOB_E_CORRUPT_METADATA', [paths.bitmap]);
  });

  it('refuses metadata that is garbage bytes, not SQLite', async () => {
    await makeCache();
    writeFileSync(paths.metadata, randomBytes(16384));
    await expectRefused(() => openCache(disk), CorruptMetadataError, 'ULOB_E_CORRUPT_METADATA', [paths.metadata]);
  });

  it('refuses metadata of another format version', async () => {
    await makeCache();
    const db = new Database(paths.metadata);
    db.pragma('user_version = 99');
    db.close();
    await expectRefused(() => openCache(disk), CorruptMetadataError, 'ULOB_E_CORRUPT_METADATA', [paths.metadata, '99']);
  });

  it('refuses metadata whose cache_info row is gone', async () => {
    await makeCache();
    const db = new Database(paths.metadata);
    db.exec('DELETE FROM cache_info');
    db.close();
    await expectRefused(() => openCache(disk), CorruptMetadataError, 'ULOB_E_CORRUPT_METADATA', [paths.metadata, 'cache_info']);
  });

  it('refuses metadata with a dirty extent outside the disk', async () => {
    await makeCache();
    const db = new Database(paths.metadata);
    db.prepare('INSERT INTO dirty (start, count) VALUES (?, ?)').run(BLOCKS - 2, 3);
    db.close();
    await expectRefused(() => openCache(disk), CorruptMetadataError, 'ULOB_E_CORRUPT_METADATA', [paths.metadata, `${BLOCKS - 2}+3`]);
  });

  it('refuses a budget the flash filesystem cannot hold, saying what is free, and creates nothing', async () => {
    const source = await openBacking(disk, { writable: true });
    cleanups.push(() => source.close());
    const storage = { ...posixStorage, freeBytes: async () => 100 * 1024 };
    await expectRefused(
      () => CacheStore.open({ paths, backing: source, mode: 'writeback', budget: 200 * 1024, evictionUnit: 64 * 1024, storage }),
      InvalidArgumentError,
      'ULOB_E_INVALID_ARG',
      ['a cache budget of 200 KiB does not fit', `${dir} has 100 KiB free`],
    );
    expect(ls()).toEqual(['disk.img']);
  });

  it('takes a budget above the disk when the disk fits: the cache file never holds more than the disk', async () => {
    const source = await openBacking(disk, { writable: true });
    cleanups.push(() => source.close());
    const tight = { ...posixStorage, freeBytes: async () => BLOCKS * BS - 1 };
    await expectRefused(
      () => CacheStore.open({ paths, backing: source, mode: 'writeback', budget: 2 ** 40, evictionUnit: 64 * 1024, storage: tight }),
      InvalidArgumentError,
      'ULOB_E_INVALID_ARG',
      ['a cache budget of 1 TiB does not fit'],
    );
    // The new bitmap beside the cache file takes from the same free space (newuser13).
    const bitmapBytes = new Geometry(BLOCKS * BS, BS).bitmapFileSize;
    const noBitmap = { ...posixStorage, freeBytes: async () => BLOCKS * BS };
    await expectRefused(
      () => CacheStore.open({ paths, backing: source, mode: 'writeback', budget: 2 ** 40, evictionUnit: 64 * 1024, storage: noBitmap }),
      InvalidArgumentError,
      'ULOB_E_INVALID_ARG',
      ['a cache budget of 1 TiB does not fit', `and the bitmap takes ${formatBytes(bitmapBytes)} of it`],
    );
    const room = { ...posixStorage, freeBytes: async () => BLOCKS * BS + bitmapBytes };
    const store = await CacheStore.open({ paths, backing: source, mode: 'writeback', budget: 2 ** 40, evictionUnit: 64 * 1024, storage: room });
    await store.close();
  });

  it('refuses a budget of less than two eviction units, and an eviction unit that is not a power of two', async () => {
    const source = await openBacking(disk, { writable: true });
    cleanups.push(() => source.close());
    await expectRefused(
      () => CacheStore.open({ paths, backing: source, mode: 'writeback', budget: 100 * 1024, evictionUnit: 64 * 1024 }),
      InvalidArgumentError,
      'ULOB_E_INVALID_ARG',
      ['less than two eviction units (128 KiB)'],
    );
    await expectRefused(
      () => CacheStore.open({ paths, backing: source, mode: 'writeback', budget: 1 << 20, evictionUnit: 96 * 1024 }),
      InvalidArgumentError,
      'ULOB_E_INVALID_ARG',
      ['eviction unit must be a power of two'],
    );
    expect(ls()).toEqual(['disk.img']);
  });

  it('refuses a cache file whose metadata is missing', async () => {
    await makeCache();
    rmSync(paths.metadata);
    await expectRefused(() => openCache(disk), CorruptMetadataError, 'ULOB_E_CORRUPT_METADATA', [paths.cache, paths.metadata]);
  });

  it('refuses to take over a random existing file given as the cache', async () => {
    // The user pointed -c at a file of theirs: no metadata next to it.
    const precious = join(dir, 'photos.tar');
    writeFileSync(precious, randomBytes(3 * BS + 17));
    paths = { cache: precious, bitmap: join(dir, 'photos.bitmap'), metadata: join(dir, 'photos.meta') };
    await expectRefused(() => openCache(disk), CorruptMetadataError, 'ULOB_E_CORRUPT_METADATA', [precious]);
    expect(ls()).toEqual(['disk.img', 'photos.tar']);
  });

  it('refuses a cache another process holds open', async () => {
    await makeCache();
    const stop = await holdMetadataInAnotherProcess(paths.metadata);
    const err = await expectRefused(() => openCache(disk), CacheBusyError, 'ULOB_E_CACHE_BUSY', [paths.metadata]);
    expect(err.message).toBe(`${paths.metadata} is in use by another ulobdev process`);
    await stop();
    const { store } = await openCache(disk);
    expect(store.recoveredFromCrash).toBe(false);
  });

  it('refuses a second open while the first is open, and the first still works', async () => {
    const first = await openCache(disk, { blockSize: BS });
    // SQLite keeps the refused connection's descriptor open until the first connection of this
    // process lets go of its locks (closing it would drop them: POSIX locks are per process), so
    // descriptors are checked after the first store closes, below.
    const err = await expectRefused(() => openCache(disk), CacheBusyError, 'ULOB_E_CACHE_BUSY', [paths.metadata], [], {
      checkFds: false,
    });
    expect(err.message).toBe(`${paths.metadata} is in use by another ulobdev process`);
    // The first store serves I/O, flushes and closes cleanly after the refused open.
    const engine = new CacheEngine(first.store, first.source, { autoCommitMs: 0 });
    const data = randomBytes(2 * BS);
    await engine.write(3 * BS, data);
    expect((await engine.read(3 * BS, 2 * BS)).equals(data)).toBe(true);
    const flushed = await flushDirty(engine);
    expect(flushed.cleaned).toBe(2);
    await engine.close();
    await first.source.close();
    expect(fdsInto(dir)).toEqual([]);
    expect(readFileSync(disk).subarray(3 * BS, 5 * BS).equals(data)).toBe(true);
    const again = await openCache(disk);
    expect(again.store.recoveredFromCrash).toBe(false);
    expect(again.store.present.allSet(3, 5)).toBe(true);
  });

  for (const bad of [3000, 2 * 1024 * 1024, 8191, 0, 2048]) {
    it(`refuses block size ${bad} (InvalidArgumentError), for a new cache and for an existing one`, async () => {
      await expectRefused(() => openCache(disk, { blockSize: bad }), InvalidArgumentError, 'ULOB_E_INVALID_ARG', [String(bad)]);
      expect(ls()).toEqual(['disk.img']);
      await makeCache();
      await expectRefused(() => openCache(disk, { blockSize: bad }), InvalidArgumentError, 'ULOB_E_INVALID_ARG', [String(bad)]);
    });
  }
});

describe('a creation that fails midway leaves nothing behind', () => {
  it('removes the new cache file and metadata when the bitmap cannot be created, naming the bitmap', async () => {
    paths = { ...paths, bitmap: join(dir, 'no-such-dir', 'bitmap') };
    const err = await expectRefused(() => openCache(disk, { blockSize: BS }), IOFailedError, 'ULOB_E_IO', [paths.bitmap, 'ENOENT']);
    expect((err as IOFailedError).path).toBe(paths.bitmap);
    expect(ls()).toEqual(['disk.img']);
  });

  it('refuses a full mirror larger than its filesystem before allocating it, and removes everything', async () => {
    const mnt = mkdtempSync(join(tmpdir(), 'ulob-store-open-tmpfs-'));
    cleanups.push(() => rmSync(mnt, { recursive: true, force: true }));
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=128k', 'tmpfs', mnt]);
    try {
      paths = { cache: join(mnt, 'cache'), bitmap: join(mnt, 'bitmap'), metadata: join(mnt, 'cache.meta') };
      // Was ENOSPC from the allocation ("the filesystem holding it is full", newuser7 item 27).
      await expectRefused(() => openCache(disk, { blockSize: BS }), InvalidArgumentError, 'ULOB_E_INVALID_ARG', [paths.cache, 'a full mirror of', 'KiB free', 'a larger filesystem'], [mnt]);
      expect(readdirSync(mnt)).toEqual([]);
    } finally {
      execFileSync('umount', [mnt]);
    }
  });
});

// --- openBacking ----------------------------------------------------------------------------------

describe('openBacking refuses what is not a free disk or file', () => {
  it('refuses a directory', async () => {
    const sub = join(dir, 'not-a-disk');
    mkdirSync(sub);
    await expectRefused(() => openBacking(sub, { writable: true }), InvalidArgumentError, 'ULOB_E_INVALID_ARG', [sub]);
  });

  it('refuses a missing path', async () => {
    const missing = join(dir, 'no-such-disk');
    // Words, not an errno (newuser7 item 8: "cannot open backing device ...: ENOENT (stat)").
    await expectRefused(() => openBacking(missing, { writable: true }), InvalidArgumentError, 'ULOB_E_INVALID_ARG', [missing, 'does not exist', 'lsblk']);
    expect(ls()).toEqual(['disk.img']);
  });

  it('refuses an empty file', async () => {
    const empty = join(dir, 'empty.img');
    writeFileSync(empty, '');
    await expectRefused(() => openBacking(empty, { writable: true }), InvalidArgumentError, 'ULOB_E_INVALID_ARG', [empty]);
  });

  it('refuses a backing file attached to a loop device', async () => {
    await makeCache();
    const loop = losetup(disk);
    try {
      await expectRefused(() => openCache(disk), DeviceBusyError, 'ULOB_E_DEVICE_BUSY', [disk, loop, `losetup -d ${loop}`]);
    } finally {
      detach(loop);
    }
    // Detached, the same file opens (positive control).
    const { store } = await openCache(disk);
    expect(store.recoveredFromCrash).toBe(false);
  });

  describe('block devices', () => {
    let image: string;
    beforeEach(() => {
      image = join(dir, 'blockdev.img');
      rmSync(disk);
      writeFileSync(image, '');
      truncateSync(image, 16 * 1024 * 1024);
    });

    it('opens a free loop device exclusively (positive control)', async () => {
      const loop = losetup(image);
      try {
        const source: FileSource = await openBacking(loop, { writable: true });
        try {
          expect(source.size).toBe(16 * 1024 * 1024);
          expect(source.id).toMatch(/^loop:file:\d+:\d+:\d+@0$/);
          // While we hold it, nobody else gets it exclusively.
          expect(() => openSync(loop, fsc.O_RDONLY | fsc.O_EXCL)).toThrow(/EBUSY/);
        } finally {
          await source.close();
        }
      } finally {
        detach(loop);
      }
    });

    it('refuses a mounted block device, naming the mount point', async () => {
      const mnt = mkdtempSync(join(tmpdir(), 'ulob-store-open-mnt-'));
      cleanups.push(() => rmSync(mnt, { recursive: true, force: true }));
      const loop = losetup(image);
      try {
        execFileSync('mkfs.ext4', ['-q', '-F', '-E', 'lazy_itable_init=0,lazy_journal_init=0', loop]);
        execFileSync('mount', [loop, mnt]);
        try {
          await expectRefused(() => openBacking(loop, { writable: true }), DeviceBusyError, 'ULOB_E_DEVICE_BUSY', [
            loop,
            `mounted on ${mnt}`,
          ]);
          // Read-only attach is refused too: the mounted filesystem's writes would not reach the cache.
          await expectRefused(() => openBacking(loop, { writable: false }), DeviceBusyError, 'ULOB_E_DEVICE_BUSY', [loop, 'mounted']);
        } finally {
          execFileSync('umount', [mnt]);
        }
      } finally {
        detach(loop);
      }
    });

    it('refuses a block device another program holds with O_EXCL', async () => {
      const loop = losetup(image);
      try {
        const fd = openSync(loop, fsc.O_RDONLY | fsc.O_EXCL);
        try {
          await expectRefused(() => openBacking(loop, { writable: true }), DeviceBusyError, 'ULOB_E_DEVICE_BUSY', [loop, 'in use'], [loop]);
        } finally {
          closeSync(fd);
        }
        // Released, it opens (the refusal was the holder's doing).
        const source = await openBacking(loop, { writable: false });
        await source.close();
      } finally {
        detach(loop);
      }
    });
  });
});

// --- CacheStore.discard ---------------------------------------------------------------------------

describe('CacheStore.discard', () => {
  it('refuses while dirty blocks exist and removes nothing', async () => {
    await makeCache({ dirtyBlocks: 3 });
    await expectRefused(() => CacheStore.discard(paths), DirtyDataError, 'ULOB_E_DIRTY', [paths.cache, '12 KiB of dirty data', '--force']);
    expect(ls()).toEqual(['bitmap', 'cache', 'cache.meta', 'cache.meta-reserve', 'disk.img']);
  });

  it('refuses while the cache is open, and removes nothing', async () => {
    await makeCache({ dirtyBlocks: 1 });
    await holdMetadataInAnotherProcess(paths.metadata);
    await expectRefused(() => CacheStore.discard(paths, { force: true }), CacheBusyError, 'ULOB_E_CACHE_BUSY', [paths.metadata]);
  });

  it('removes a dirty cache with force, reporting what was lost, and leaves the disk alone', async () => {
    await makeCache({ dirtyBlocks: 3 });
    const diskHash = hashFile(disk);
    expect(await CacheStore.discard(paths, { force: true })).toEqual({ dirtyBlocks: 3, bitmap: paths.bitmap });
    expect(ls()).toEqual(['disk.img']);
    expect(hashFile(disk)).toBe(diskHash);
  });

  it('removes a clean cache without force', async () => {
    await makeCache({ dirtyBlocks: 2 });
    const { store, source } = await openCache(disk);
    const engine = new CacheEngine(store, source, { autoCommitMs: 0 });
    await flushDirty(engine);
    await engine.close();
    expect(await CacheStore.discard(paths)).toEqual({ dirtyBlocks: 0, bitmap: paths.bitmap });
    expect(ls()).toEqual(['disk.img']);
  });

  it('is followed by a fresh cache at the next open: new uuid, nothing present or dirty', async () => {
    await makeCache({ dirtyBlocks: 2 });
    const first = await openCache(disk);
    const oldUuid = first.store.info.uuid;
    expect(first.store.present.count()).toBeGreaterThan(0);
    await first.store.close();
    await CacheStore.discard(paths, { force: true });
    const { store, source } = await openCache(disk);
    expect(store.info.uuid).not.toBe(oldUuid);
    expect(store.present.count()).toBe(0);
    expect(store.dirty.count()).toBe(0);
    expect(store.info.flushEpoch).toBe(0);
    // It serves the disk's bytes (the discarded dirty data is gone, as force said).
    const engine = new CacheEngine(store, source, { autoCommitMs: 0 });
    expect((await engine.read(0, SIZE)).equals(readFileSync(disk))).toBe(true);
  });

  it('refuses a cache with unreadable metadata without force, and removes it with force', async () => {
    await makeCache({ dirtyBlocks: 1 });
    writeFileSync(paths.metadata, Buffer.alloc(8192, 0x5a));
    await expectRefused(() => CacheStore.discard(paths), CorruptMetadataError, 'ULOB_E_CORRUPT_METADATA', [paths.metadata]);
    expect(ls()).toEqual(['bitmap', 'cache', 'cache.meta', 'cache.meta-reserve', 'disk.img']);
    expect(await CacheStore.discard(paths, { force: true })).toEqual({ dirtyBlocks: 0 });
    expect(ls()).toEqual(['disk.img']);
  });

  it('refuses to remove the disk itself given as the cache, even with force, and removes nothing', async () => {
    // `ulobdev discard -c disk.img --force disk.img`: the disk has no metadata next to it.
    const onDisk = { cache: disk, bitmap: join(dir, 'bitmap'), metadata: `${disk}.meta` };
    await expectRefused(() => CacheStore.discard(onDisk, { force: true, backing: disk }), InvalidArgumentError, 'ULOB_E_INVALID_ARG', [
      disk,
      'is the disk itself',
    ]);
    // Even with metadata there (a cache once made at that path): the disk is never a cache.
    await makeCache();
    writeFileSync(onDisk.metadata, readFileSync(paths.metadata));
    await expectRefused(() => CacheStore.discard(onDisk, { force: true, backing: disk }), InvalidArgumentError, 'ULOB_E_INVALID_ARG', [disk]);
    expect(ls()).toContain('disk.img');
  });

  it('refuses a file with no metadata next to it (not a cache), even with force, and removes nothing', async () => {
    const other = join(dir, 'precious.img');
    writeFileSync(other, 'data of some other program');
    const notCache = { cache: other, bitmap: join(dir, 'bitmap'), metadata: `${other}.meta` };
    await expectRefused(() => CacheStore.discard(notCache, { force: true }), InvalidArgumentError, 'ULOB_E_INVALID_ARG', [
      other,
      'is not a ulobdev cache',
    ]);
    expect(readFileSync(other, 'utf8')).toBe('data of some other program');
  });

  it('refuses a directory or device as a cache path, even with force', async () => {
    await expectRefused(() => CacheStore.discard({ ...paths, bitmap: '/dev/null' }, { force: true }), InvalidArgumentError, 'ULOB_E_INVALID_ARG', [
      '/dev/null',
      'not a regular file',
    ]);
    mkdirSync(join(dir, 'adir'));
    await expectRefused(() => CacheStore.discard({ ...paths, cache: join(dir, 'adir') }, { force: true }), InvalidArgumentError, 'ULOB_E_INVALID_ARG', [
      'is a directory',
    ]);
  });

  it('of a cache that does not exist (a typo, no default cache) is refused, with or without force, and removes nothing (newuser8 item 3)', async () => {
    for (const force of [false, true]) {
      await expectRefused(() => CacheStore.discard(paths, { force }), InvalidArgumentError, 'ULOB_E_INVALID_ARG', [
        `no cache at ${paths.cache} (no ${paths.metadata}); discard removes nothing`,
      ]);
    }
    expect(ls()).toEqual(['disk.img']);
  });
});
