// The upcall handler a kernel frontend drives (src/bdev/upcalls.ts), from the failure side: a miss
// whose source read fails answers a negative errno, logs one line, and leaves nothing rejected
// (the daemon of issue 11 died of exactly that); intents and barriers record what they must.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { constants, tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { Bitmap } from '../../src/cache/bitmap.js';
import { CacheEngine } from '../../src/cache/engine.js';
import { CacheStore } from '../../src/cache/store.js';
import { FailureLog, replyErrno, UpcallHandler } from '../../src/bdev/upcalls.js';
import { openBacking } from '../../src/source/backing.js';
import type { WritableSource } from '../../src/source/source.js';
import { IOFailedError, ReadOnlyError } from '../../src/errors.js';

const BS = 4096;
let dir: string;
let engine: CacheEngine;
let failReads = false;
const lines: string[] = [];
const logger = pino({ level: 'warn' }, { write: (s: string) => void lines.push(JSON.parse(s).msg as string) });
const unhandled: unknown[] = [];
const onUnhandled = (e: unknown) => void unhandled.push(e);

beforeEach(async () => {
  dir = mkdtempSync(join(tmpdir(), 'ulob-upcalls-'));
  writeFileSync(join(dir, 'disk'), Buffer.alloc(64 * BS, 7));
  const backing = await openBacking(join(dir, 'disk'), { writable: true });
  const source: WritableSource = {
    size: backing.size,
    id: backing.id,
    description: 'disk',
    readAt: async (buf, pos) => {
      if (failReads) throw Object.assign(new Error('EIO: i/o error, pread'), { code: 'EIO', syscall: 'pread' });
      await backing.readAt(buf, pos);
    },
    writeAt: (buf, pos) => backing.writeAt(buf, pos),
    sync: () => backing.sync(),
    close: () => backing.close(),
  };
  const store = await CacheStore.open({ paths: { cache: join(dir, 'c'), bitmap: join(dir, 'b'), metadata: join(dir, 'm') }, backing: source, mode: 'writeback', blockSize: BS });
  engine = new CacheEngine(store, source, { autoCommitMs: 0 });
  failReads = false;
  lines.length = 0;
  unhandled.length = 0;
  process.on('unhandledRejection', onUnhandled);
});

afterEach(async () => {
  process.off('unhandledRejection', onUnhandled);
  await engine.close();
  rmSync(dir, { recursive: true, force: true });
});

function handler(barrier?: Bitmap): UpcallHandler {
  return new UpcallHandler({ engine, logger, device: '/dev/uloop9', port: { barrierBlocks: () => barrier ?? new Bitmap(64) } });
}

describe('UpcallHandler', () => {
  it('a miss whose disk read fails answers -EIO, logs one line for many, rejects nothing', async () => {
    const h = handler();
    failReads = true;
    const results = await Promise.all(Array.from({ length: 5 }, (_, i) => h.run({ id: i + 1, type: 'miss', offset: i * BS, length: BS })));
    await new Promise((r) => setTimeout(r, 20));
    expect(results).toEqual(Array(5).fill(-constants.errno.EIO));
    expect(lines.filter((l) => l.includes('miss of 4096 bytes'))).toHaveLength(1);
    expect(lines[0]).toMatch(/\/dev\/uloop9: miss of 4096 bytes at 0 failed \(EIO to the kernel\)/);
    expect(unhandled).toEqual([]);
    expect(h.inFlight).toBe(0);
    // The disk recovers: the next miss fills.
    failReads = false;
    expect(await h.run({ id: 9, type: 'miss', offset: 0, length: BS })).toBe(0);
    await engine.flush();
    expect(engine.store.present.get(0)).toBe(true);
  });

  it('an intent makes the blocks durably dirty, syncing a fill the store has not recorded yet', async () => {
    const h = handler();
    expect(await h.run({ id: 1, type: 'miss', offset: 0, length: 2 * BS })).toBe(0);
    expect(engine.store.present.get(0)).toBe(false); // staged: the engine has not committed it
    expect(await h.run({ id: 2, type: 'intent', offset: BS, length: BS })).toBe(0);
    expect(engine.store.dirty.get(1)).toBe(true);
    expect(engine.store.present.get(1)).toBe(true);
  });

  it('a barrier records the handed-over blocks present and dirty', async () => {
    const bits = new Bitmap(64);
    bits.setRange(10, 14);
    const h = handler(bits);
    expect(await h.run({ id: 3, type: 'barrier', offset: 0, length: 8 })).toBe(0);
    expect(engine.store.dirty.count()).toBe(4);
    expect(engine.store.present.allSet(10, 14)).toBe(true);
  });

  it('a barrier whose bits cannot be fetched answers its errno', async () => {
    const h = new UpcallHandler({
      engine,
      logger,
      device: '/dev/uloop9',
      port: {
        barrierBlocks: () => {
          throw Object.assign(new Error('ENOENT: no such file or directory, ioctl(ULOOP_IOC_BARRIER_BITS)'), { code: 'ENOENT' });
        },
      },
    });
    expect(await h.run({ id: 4, type: 'barrier', offset: 0, length: 8 })).toBe(-constants.errno.ENOENT);
    expect(unhandled).toEqual([]);
  });

  it('drain() waits for the upcalls in flight', async () => {
    const h = handler();
    const p = h.run({ id: 1, type: 'miss', offset: 0, length: 4 * BS });
    expect(h.inFlight).toBe(1);
    await h.drain();
    expect(h.inFlight).toBe(0);
    expect(await p).toBe(0);
  });
});

describe('replyErrno and FailureLog', () => {
  it('maps errors to negative errnos through the cause chain, EIO by default', () => {
    expect(replyErrno(new IOFailedError('x', { cause: { code: 'ENOSPC' } }))).toBe(-constants.errno.ENOSPC);
    expect(replyErrno(new ReadOnlyError('ro'))).toBe(-constants.errno.EROFS);
    expect(replyErrno(new Error('plain'))).toBe(-constants.errno.EIO);
    expect(replyErrno('a string')).toBe(-constants.errno.EIO);
  });

  it('says a line once per quiet time and counts the rest', () => {
    const out: string[] = [];
    const log = new FailureLog(pino({ level: 'warn' }, { write: (s: string) => void out.push(JSON.parse(s).msg as string) }), 0);
    const quiet = new FailureLog(pino({ level: 'warn' }, { write: (s: string) => void out.push(JSON.parse(s).msg as string) }), 60_000);
    quiet.warn('k', 'a');
    quiet.warn('k', 'a');
    quiet.warn('other', 'b');
    expect(out).toEqual(['a', 'b']);
    log.warn('k', 'c');
    log.warn('k', 'c');
    expect(out.slice(2)).toEqual(['c', 'c']);
  });
});
