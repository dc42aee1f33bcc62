// The engine's fill buffers (src/cache/engine.ts, #fill): a fill that fits one fill buffer takes a
// buffer of its own size class from a pool, so many small misses in flight at once (16 at QD16 on
// /dev/uloopN or /dev/ublkbN, each a 4 KiB fill) allocate about their own size, not a whole
// 1 MiB fill buffer each past the 8 kept (bench/budget.js: the addon zeroing those on the event
// loop was 16-19 % of the daemon's CPU). Every byte the addon's alignedBuffer() hands out during
// the fills is counted; the fills are held at the source until all 32 are in flight; each block
// reads back as the disk holds it, and a second round reuses the pooled buffers (no new memory).
// A long fill (prefetch of 4 MiB, more than one fill buffer) still streams through whole buffers.
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it, vi } from 'vitest';

const allocated = { bytes: 0, calls: 0 };
vi.mock('../../src/native/io.js', async (importOriginal) => {
  const io = await importOriginal<typeof import('../../src/native/io.js')>();
  return {
    ...io,
    alignedBuffer: (size: number, alignment?: number) => {
      allocated.bytes += size;
      allocated.calls++;
      return io.alignedBuffer(size, alignment);
    },
  };
});

const { CacheEngine } = await import('../../src/cache/engine.js');
const { CacheStore } = await import('../../src/cache/store.js');
const { openBacking } = await import('../../src/source/backing.js');
type Source = import('../../src/source/source.js').Source;

const KiB = 1024;
const MiB = 1 << 20;
const SIZE = 64 * MiB;
const dirs: string[] = [];
afterAll(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

/** A source whose reads (readAt, copyInto) wait for `open()` once `held` of them have started. */
function gated(inner: Source & { copyInto?: Source['copyInto'] }) {
  let release!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  let started = 0;
  let allIn!: () => void;
  const allStarted = new Promise<void>((r) => (allIn = r));
  const hold = async (held: number) => {
    started++;
    if (started >= held) allIn();
    await gate;
  };
  let held = Infinity;
  const source: Source = {
    size: inner.size,
    id: inner.id,
    description: inner.description,
    readAt: async (buf, position) => {
      await hold(held);
      return inner.readAt(buf, position);
    },
    copyInto: inner.copyInto
      ? async (into, buf, position, intoPosition) => {
          await hold(held);
          return inner.copyInto!(into, buf, position, intoPosition);
        }
      : undefined,
    streamInto: inner.streamInto?.bind(inner),
    close: () => inner.close(),
  };
  return {
    source,
    /** The next `n` reads are held until open(); resolves when all `n` have started. */
    expect(n: number) {
      held = n;
      started = 0;
      return allStarted;
    },
    open: () => release(),
  };
}

describe('fill buffers', () => {
  it('32 concurrent 4 KiB misses allocate about their own size (not 1 MiB each past the pool), reuse it, and read back the disk', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'ulob-fillbuf-'));
    dirs.push(dir);
    const disk = join(dir, 'disk.img');
    const data = randomBytes(SIZE);
    writeFileSync(disk, data);
    const file = await openBacking(disk, { writable: false });
    const g = gated(file);
    const store = await CacheStore.open({
      paths: { cache: join(dir, 'cache'), bitmap: join(dir, 'bitmap'), metadata: join(dir, 'cache.meta') },
      backing: g.source,
      mode: 'readonly',
      budget: SIZE / 8,
      evictionUnit: 256 * KiB,
    });
    const engine = new CacheEngine(store, g.source, { autoCommitMs: 0 });
    try {
      // 32 blocks, each in a 64 KiB granule of its own (1 MiB apart), as a kernel frontend's MISS
      // upcalls ask for them (prefetch: the block asked for only).
      const offsets = Array.from({ length: 32 }, (_, i) => i * MiB + 8 * KiB);
      const allIn = g.expect(offsets.length);
      allocated.bytes = 0;
      allocated.calls = 0;
      const fills = offsets.map((o) => engine.prefetch(o, 4 * KiB));
      await allIn; // every fill has its buffer and waits at the source
      const during = { ...allocated };
      g.open();
      await Promise.all(fills);
      // 32 fills of 4 KiB: 128 KiB of buffers. The bug: 1 MiB each past the 8 pooled (24+ MiB).
      expect(during.bytes, `alignedBuffer during 32 fills: ${during.calls} calls, ${during.bytes} bytes`).toBeLessThanOrEqual(32 * 4 * KiB);
      for (const o of offsets) expect((await engine.read(o, 4 * KiB)).equals(data.subarray(o, o + 4 * KiB)), `block at ${o}`).toBe(true);

      // A second round of misses takes the buffers the first gave back.
      const again = offsets.map((o) => o + 64 * KiB);
      allocated.bytes = 0;
      await Promise.all(again.map((o) => engine.prefetch(o, 4 * KiB)));
      expect(allocated.bytes, 'alignedBuffer in the second round').toBe(0);
      for (const o of again) expect((await engine.read(o, 4 * KiB)).equals(data.subarray(o, o + 4 * KiB)), `block at ${o}`).toBe(true);

      // A prefetch longer than one fill buffer (4 MiB) streams through whole ones and reads back.
      await engine.prefetch(40 * MiB, 4 * MiB);
      expect((await engine.read(40 * MiB, 4 * MiB)).equals(data.subarray(40 * MiB, 44 * MiB))).toBe(true);
    } finally {
      await engine.close();
      await file.close();
    }
  }, 60_000);
});
