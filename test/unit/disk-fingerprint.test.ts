// The disk fingerprint (src/cache/fingerprint.ts) and its life in the store: which regions it
// hashes, that a change there is seen and one elsewhere is not (the documented limit), that an
// open finding it changed starts cold without dirty data and refuses with dirty data, that a flush
// clears it before it writes the disk and takes it again once the disk is synced, and that a
// flush begun while it is being read leaves it unknown. Image files in a temp dir.
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, constants, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { CacheEngine } from '../../src/cache/engine.js';
import { diskFingerprint, fingerprintRegions, FINGERPRINT_REGION, tablePartitionStarts } from '../../src/cache/fingerprint.js';
import { execFileSync } from 'node:child_process';
import { Metadata } from '../../src/cache/metadata.js';
import { CacheStore, type CachePaths } from '../../src/cache/store.js';
import { DiskChangedError } from '../../src/errors.js';
import { openBacking } from '../../src/source/backing.js';
import type { FileSource } from '../../src/source/file-source.js';
import { flushDirty } from '../../src/writeback/flusher.js';

const MiB = 1 << 20;
const BS = 4096;
const SIZE = 8 * MiB;

let dir: string;
let disk: string;
let paths: CachePaths;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'ulob-fp-'));
  disk = join(dir, 'disk.img');
  writeFileSync(disk, randomBytes(SIZE));
  paths = { cache: join(dir, 'c.cache'), bitmap: join(dir, 'c.bitmap'), metadata: join(dir, 'c.cache.meta') };
});

afterEach(() => {
  rmSync(dir, { recursive: true, force: true });
});

/** Writes `bytes` into the image at `at`, as a mount would (outside ulobdev). */
function poke(at: number, bytes = randomBytes(16)): void {
  const fd = openSync(disk, 'r+');
  try {
    writeSync(fd, bytes, 0, bytes.length, at);
  } finally {
    closeSync(fd);
  }
}

async function open(source: FileSource, options: { fingerprint?: () => Promise<string> } = {}): Promise<CacheStore> {
  return CacheStore.open({ paths, backing: source, mode: 'writeback', blockSize: BS, budget: 4 * MiB, fingerprint: options.fingerprint ?? (() => diskFingerprint(source)) });
}

function info() {
  const m = Metadata.open(paths.metadata);
  try {
    return { fingerprint: m.info.diskFingerprint, events: m.events(0, 'disk-changed') };
  } finally {
    m.close();
  }
}

describe('fingerprintRegions', () => {
  it('the first and last MiB and each partition start inside the disk, sorted, each once, cut at the end; a 4 KiB probe at 1, 2, 16 and 17 MiB past each start that fits', () => {
    expect(fingerprintRegions(SIZE)).toEqual([
      [0, MiB],
      [MiB, 4096],
      [2 * MiB, 4096],
      [SIZE - MiB, MiB],
    ]);
    expect(fingerprintRegions(SIZE, [2 * MiB, 1 * MiB, 2 * MiB, SIZE - 4096, SIZE, -1])).toEqual([
      [0, MiB],
      [MiB, MiB],
      [2 * MiB, MiB],
      [3 * MiB, 4096],
      [4 * MiB, 4096],
      [SIZE - MiB, MiB],
      [SIZE - 4096, 4096],
    ]);
    // LUKS2's payload (16 MiB) and LUKS2 on LVM (17 MiB), on a larger disk.
    expect(fingerprintRegions(64 * MiB).filter(([, len]) => len === 4096)).toEqual([
      [MiB, 4096],
      [2 * MiB, 4096],
      [16 * MiB, 4096],
      [17 * MiB, 4096],
    ]);
    // A disk smaller than two regions: they overlap, none reaches past the end.
    expect(fingerprintRegions(MiB + MiB / 2)).toEqual([
      [0, MiB],
      [MiB / 2, MiB],
      [MiB, 4096],
    ]);
    expect(fingerprintRegions(4096)).toEqual([[0, 4096]]);
  });
});

describe('diskFingerprint', () => {
  it('changes with a byte in the first or last MiB or at a partition start, not with one elsewhere (the documented limit)', async () => {
    const source = await openBacking(disk, { writable: false });
    const parts = { size: source.size, readAt: (b: Uint8Array, p: number) => source.readAt(b, p), partitionStarts: async () => [3 * MiB] };
    try {
      const base = await diskFingerprint(parts);
      expect(base).toMatch(/^sha256:[0-9a-f]{64}$/);
      expect(await diskFingerprint(parts)).toBe(base);
      const changedAt = async (at: number) => {
        const old = readFileSync(disk).subarray(at, at + 16);
        poke(at);
        const fp = await diskFingerprint(parts);
        poke(at, Buffer.from(old));
        expect(await diskFingerprint(parts)).toBe(base);
        return fp !== base;
      };
      expect(await changedAt(1024)).toBe(true);
      expect(await changedAt(SIZE - 16)).toBe(true);
      expect(await changedAt(3 * MiB + 1024)).toBe(true);
      expect(await changedAt(3 * MiB + FINGERPRINT_REGION + 4096)).toBe(false);
      // The container probes: LVM's first extent behind the disk's start, LUKS1's payload behind the partition's.
      expect(await changedAt(MiB + 1024)).toBe(true);
      expect(await changedAt(5 * MiB + 1024)).toBe(true);
      expect(await changedAt(6 * MiB)).toBe(false);
    } finally {
      await source.close();
    }
  });
});

describe('partitions read from the disk\'s own table', () => {
  /** A minimal GPT in the first 64 KiB: header at LBA 1, entries at LBA 2, used entries starting at `firsts` (LBAs). */
  function gpt(sector: number, firsts: number[]): Buffer {
    const head = Buffer.alloc(64 * 1024);
    head.write('EFI PART', sector, 'latin1');
    head.writeBigUInt64LE(2n, sector + 72);
    head.writeUInt32LE(128, sector + 80);
    head.writeUInt32LE(128, sector + 84);
    firsts.forEach((lba, i) => {
      const e = 2 * sector + i * 128;
      head.fill(0xaa, e, e + 16); // a type GUID: the entry is used
      head.writeBigUInt64LE(BigInt(lba), e + 32);
    });
    return head;
  }

  it('GPT with 512- and 4096-byte sectors, MBR in both sector sizes, nothing from a table-less disk', () => {
    expect(tablePartitionStarts(gpt(512, [2048, 6144]))).toEqual([2048 * 512, 6144 * 512]);
    expect(tablePartitionStarts(gpt(4096, [256, 768]))).toEqual([256 * 4096, 768 * 4096]);
    const mbr = Buffer.alloc(4096);
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    mbr[446 + 4] = 0x83;
    mbr.writeUInt32LE(2048, 446 + 8);
    mbr[446 + 16 + 4] = 0xee; // a protective entry is no partition
    mbr.writeUInt32LE(1, 446 + 16 + 8);
    expect(tablePartitionStarts(mbr)).toEqual([2048 * 512, 2048 * 4096]);
    expect(tablePartitionStarts(randomBytes(4096).fill(0, 510, 512))).toEqual([]);
  });

  it('an image file with a GPT (no sysfs partitions): a change at a partition\'s start changes the fingerprint (newuser9b F1)', async () => {
    // sgdisk (gdisk: a test dependency, scripts/install-test-deps.sh) writes a real table.
    execFileSync('sgdisk', ['-n1:2048:+2M', '-n2:8192:0', disk], { stdio: 'ignore' });
    const source = await openBacking(disk, { writable: false });
    try {
      const base = await diskFingerprint(source);
      poke(8192 * 512 + 1024);
      expect(await diskFingerprint(source)).not.toBe(base);
    } finally {
      await source.close();
    }
  });
});

describe('diskFingerprint with the disk\'s path', () => {
  it('reads through its own O_DIRECT descriptor (past the page cache of whoever holds the disk), the same hash as through the disk', async () => {
    const source = await openBacking(disk, { writable: false });
    try {
      const viaDisk = await diskFingerprint(source);
      let direct = true;
      try {
        closeSync(openSync(disk, constants.O_RDONLY | constants.O_DIRECT));
      } catch {
        direct = false; // tmpfs: the disk's own reads are the fallback
      }
      const never = async () => {
        throw new Error('read through the disk');
      };
      const viaPath = diskFingerprint({ size: source.size, readAt: direct ? never : (b, p) => source.readAt(b, p), path: disk });
      expect(await viaPath).toBe(viaDisk);
    } finally {
      await source.close();
    }
  });
});

describe('the store and the fingerprint', () => {
  it('kept at the first open; an open that finds it changed, without dirty data, drops every present bit durably, records an event, and keeps the new one', async () => {
    let source = await openBacking(disk, { writable: true });
    let store = await open(source);
    const engine = new CacheEngine(store, source, { autoCommitMs: 0 });
    await engine.read(0, 2 * MiB);
    await engine.close();
    await source.close();
    const first = info().fingerprint;
    expect(first).toMatch(/^sha256:/);

    // Unchanged: taken as it is.
    source = await openBacking(disk, { writable: true });
    store = await open(source);
    expect(store.diskChanged).toBe(false);
    expect(store.present.count()).toBe((2 * MiB) / BS);
    await store.close();
    await source.close();

    poke(1024);
    source = await openBacking(disk, { writable: true });
    store = await open(source);
    expect(store.diskChanged).toBe(true);
    expect(store.present.count()).toBe(0);
    // Written before the open returns (and before the new fingerprint was kept), not at close.
    expect(readFileSync(paths.bitmap).every((b) => b === 0)).toBe(true);
    await store.close();
    await source.close();
    // Durably: the bitmap file holds no bit, and the metadata the disk as it is now.
    expect(readFileSync(paths.bitmap).every((b) => b === 0)).toBe(true);
    const after = info();
    expect(after.fingerprint).not.toBe(first);
    expect(after.fingerprint).toBe(await (async () => {
      const s = await openBacking(disk, { writable: false });
      try {
        return await diskFingerprint(s);
      } finally {
        await s.close();
      }
    })());
    expect(after.events).toEqual([expect.objectContaining({ kind: 'disk-changed', detail: expect.stringMatching(/^the disk was written without ulobdev; 2 MiB of clean blocks dropped$/) })]);
  });

  it('with dirty data: refused (ULOB_E_DISK_CHANGED), the cache files unchanged', async () => {
    let source = await openBacking(disk, { writable: true });
    const store = await open(source);
    const engine = new CacheEngine(store, source, { autoCommitMs: 0 });
    await engine.write(MiB, randomBytes(BS));
    await engine.close();
    await source.close();
    poke(SIZE - 100);
    const hashes = () => [paths.cache, paths.bitmap, paths.metadata].map((p) => createHash('sha256').update(readFileSync(p)).digest('hex'));
    const before = hashes();
    source = await openBacking(disk, { writable: true });
    try {
      const err = await open(source).then(
        () => null,
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(DiskChangedError);
      expect((err as DiskChangedError).code).toBe('ULOB_E_DISK_CHANGED');
      expect((err as Error).message).toMatch(/holds 4 KiB of dirty data .*'ulobdev discard --force -c .*c\.cache .*disk\.img'.*nothing was changed$/);
    } finally {
      await source.close();
    }
    expect(hashes()).toEqual(before);
  });

  it('a flush clears it before it writes the disk and takes it again once the disk is synced; a flush begun during the read leaves it unknown', async () => {
    const source = await openBacking(disk, { writable: true });
    let reads = 0;
    let gate: Promise<void> | null = null;
    const store = await open(source, {
      fingerprint: async () => {
        reads++;
        if (gate) await gate;
        return diskFingerprint(source);
      },
    });
    const engine = new CacheEngine(store, source, { autoCommitMs: 0 });
    try {
      const atOpen = store.info.diskFingerprint;
      expect(atOpen).toMatch(/^sha256:/);
      expect(reads).toBe(1);
      // A flush with nothing dirty neither clears nor reads.
      await flushDirty(engine, source);
      expect(reads).toBe(1);
      expect(store.info.diskFingerprint).toBe(atOpen);

      await engine.write(0, randomBytes(BS));
      const epoch = await engine.beginEpoch();
      // Cleared (in a synchronous=FULL transaction) before the flusher has written anything.
      expect(store.info.diskFingerprint).toBeNull();
      const buf = await engine.readEpoch(epoch, 0, 1);
      await source.writeAt(buf, 0);
      await engine.commitEpoch(epoch);
      expect(reads).toBe(2);
      expect(store.info.diskFingerprint).toMatch(/^sha256:/);
      expect(store.info.diskFingerprint).not.toBe(atOpen);

      // The read after a flush is held; another flush begins meanwhile: the first read is not kept.
      await engine.write(BS, randomBytes(BS));
      let release!: () => void;
      gate = new Promise((r) => (release = r));
      const e1 = await engine.beginEpoch();
      await source.writeAt(await engine.readEpoch(e1, 1, 1), BS);
      const committing = engine.commitEpoch(e1);
      while (reads < 3) await new Promise((r) => setTimeout(r, 1));
      await engine.write(2 * BS, randomBytes(BS));
      const e2 = await engine.beginEpoch();
      release();
      await committing;
      expect(store.info.diskFingerprint).toBeNull();
      gate = null;
      await source.writeAt(await engine.readEpoch(e2, 2, 1), 2 * BS);
      await engine.commitEpoch(e2);
      expect(store.info.diskFingerprint).toMatch(/^sha256:/);
    } finally {
      await engine.close();
      await source.close();
    }
    // On file as the last flush left the disk.
    const s = await openBacking(disk, { writable: false });
    try {
      expect(info().fingerprint).toBe(await diskFingerprint(s));
    } finally {
      await s.close();
    }
  });
  it('a fingerprint the open cannot read (an I/O error there): the open goes on, says why, and keeps the stored one for the next attach', async () => {
    let source = await openBacking(disk, { writable: true });
    let store = await open(source);
    await store.close();
    await source.close();
    const stored = info().fingerprint;
    expect(stored).toMatch(/^sha256:/);
    source = await openBacking(disk, { writable: true });
    store = await open(source, {
      fingerprint: async () => {
        throw Object.assign(new Error('read of disk.img failed: EIO'), { code: 'EIO' });
      },
    });
    try {
      expect((store.fingerprintError as Error).message).toMatch(/EIO/);
      expect(store.diskChanged).toBe(false);
    } finally {
      await store.close();
      await source.close();
    }
    expect(info().fingerprint).toBe(stored);
  });

  it('a flush whose fingerprint could not be taken again (cut, or the read failed) leaves it unknown until the close, which takes it: the next attach checks again', async () => {
    const source = await openBacking(disk, { writable: true });
    let failing = false;
    const store = await open(source, {
      fingerprint: async () => {
        if (failing) throw Object.assign(new Error('EIO'), { code: 'EIO' });
        return diskFingerprint(source);
      },
    });
    const engine = new CacheEngine(store, source, { autoCommitMs: 0 });
    await engine.write(0, randomBytes(BS));
    failing = true;
    await flushDirty(engine, source);
    expect(store.info.diskFingerprint).toBeNull();
    failing = false;
    await engine.close();
    await source.close();
    const s = await openBacking(disk, { writable: false });
    try {
      expect(info().fingerprint).toBe(await diskFingerprint(s));
    } finally {
      await s.close();
    }
  });
});
