// The daemon's write-back path on a simulated disk under a virtual clock: the real CacheStore,
// CacheEngine and FlushScheduler over in-memory files (storage/memory-storage.ts), the backing disk
// a DiskModel (disk-model.ts), and a trace of reads and writes replayed at their times. The caller
// owns the clock: it installs fake timers (vitest's, @sinonjs/fake-timers) before calling and
// passes `advance`, which moves the clock and runs what falls due. Used by
// test/unit/power-model.test.ts and bench/power.js.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino, { type Logger } from 'pino';
import { CacheEngine } from '../cache/engine.js';
import { CacheStore } from '../cache/store.js';
import { FileSource } from '../source/file-source.js';
import { observeReads, type Source } from '../source/source.js';
import { MemoryStorage } from '../storage/memory-storage.js';
import { DiskModel, diskModelSource, type DiskModelOptions, type DiskModelReport } from './disk-model.js';
import { FlushScheduler, type SchedulerOptions, type SchedulerStatus } from './scheduler.js';

/**
 * One request of a trace: at `at` ms from the start, `bytes` at `offset` of the device; or
 * 'external', another program reading the disk itself (smartd, a raw dd): it spins up.
 */
export interface TraceEvent {
  at: number;
  op: 'read' | 'write' | 'external';
  offset: number;
  bytes: number;
}

export interface SimOptions {
  /** Size of the simulated disk, bytes. */
  diskBytes: number;
  blockSize?: number;
  disk: DiskModelOptions;
  /** The scheduler's policy (the real options; logger, power and history are filled in). */
  policy: Omit<SchedulerOptions, 'logger' | 'power' | 'history'>;
  trace: readonly TraceEvent[];
  /** Simulated time, ms. */
  durationMs: number;
  /** Moves the fake clock by `ms`, running every timer that falls due (e.g. vi.advanceTimersByTimeAsync). */
  advance: (ms: number) => Promise<unknown>;
  /** Longest clock step between observations of dirty data, ms (default 60 s). */
  stepMs?: number;
  /** Blocks already cached (and clean) at the start, as [offset, bytes] ranges: a warm cache. */
  cached?: ReadonlyArray<[number, number]>;
  logger?: Logger;
}

export interface SimResult {
  disk: DiskModelReport;
  /** What the simulated platters do at the end (whatever the daemon believes). */
  diskState: 'active' | 'idle' | 'standby';
  status: SchedulerStatus;
  flushes: number;
  /** Flushes by reason. */
  flushReasons: Record<string, number>;
  /** Scheduler events (history): spin-ups seen or caused, standby, standby-ignored, ... */
  events: Record<string, number>;
  /** Largest dirty set, bytes (bytes at risk: the disk lacks them). */
  maxDirtyBytes: number;
  /** Longest time any write waited to reach the disk, ms (the window of unflushed data). */
  maxUnflushedMs: number;
  /** Dirty bytes at the end. */
  dirtyBytesAtEnd: number;
  /** Warnings and errors the daemon logged. */
  log: string[];
}

/** Runs `trace` through the real write-back path on a DiskModel; see the file comment. */
export async function simulate(o: SimOptions): Promise<SimResult> {
  const dir = mkdtempSync(join(tmpdir(), 'ulob-sim-'));
  const mem = new MemoryStorage();
  mem.create('/sim/disk', o.diskBytes);
  const log: string[] = [];
  const flushReasons: Record<string, number> = {};
  const logger =
    o.logger ??
    pino({ level: 'info' }, {
      write: (line: string) => {
        const entry = JSON.parse(line) as { level: number; msg: string; reason?: string };
        if (entry.msg.startsWith('flushed dirty blocks') && entry.reason) flushReasons[entry.reason] = (flushReasons[entry.reason] ?? 0) + 1;
        if (entry.level >= 40) log.push(entry.msg);
      },
    });
  const disk = new DiskModel(o.disk);
  let scheduler: FlushScheduler | undefined;
  let engine: CacheEngine | undefined;
  try {
    const handle = await mem.storage.open('/sim/disk');
    const modelled = diskModelSource(new FileSource(handle, { id: 'sim-disk', size: o.diskBytes, description: 'simulated disk' }), disk);
    // As the daemon: a read of the disk means it spins, a chance to flush.
    const source: Source = observeReads(modelled, () => scheduler?.noteDiskActive());
    const store = await CacheStore.open({
      paths: { cache: '/sim/cache', bitmap: '/sim/bitmap', metadata: join(dir, 'cache.meta') },
      backing: source,
      mode: 'writeback',
      blockSize: o.blockSize ?? 65536,
      storage: mem.storage,
    });
    engine = new CacheEngine(store, source);
    // A warm cache: what was read before the simulated day (fills spin the disk: reset after).
    for (const [offset, bytes] of o.cached ?? []) await engine.read(offset, bytes);
    scheduler = new FlushScheduler(engine, { ...o.policy, logger, power: disk, history: store.history });
    const start = Date.now();
    scheduler.start();

    let maxDirty = 0;
    let maxUnflushed = 0;
    const step = o.stepMs ?? 60_000;
    const dirtyBytes = () => Math.min(store.dirty.count() * store.geometry.blockSize, o.diskBytes);
    // Times of writes not on the disk yet, oldest first: a write is safe once a flush that began
    // after it has ended.
    const pending: number[] = [];
    const observe = () => {
      const last = store.history.lastFlush();
      if (last?.endedAt && !last.error) while (pending.length > 0 && pending[0]! < last.startedAt) pending.shift();
      if (pending.length > 0) maxUnflushed = Math.max(maxUnflushed, Date.now() - pending[0]!);
      maxDirty = Math.max(maxDirty, dirtyBytes());
    };
    let next = 0;
    // From event to event (at most `step` apart, for the observations): every timer in between
    // (scheduler ticks, polls, cron, the disk's own timers) runs inside advance().
    for (let t = 0; t < o.durationMs; ) {
      while (next < o.trace.length && o.trace[next]!.at <= t) {
        const e = o.trace[next++]!;
        if (e.op === 'write') {
          pending.push(Date.now());
          // A write into a block not cached whole reads the rest of it from the disk first.
          await untilDone(engine.write(e.offset, Buffer.alloc(e.bytes, 0x5a)).then(() => engine!.flush()), o.advance);
        } else if (e.op === 'external') {
          void disk.access('read', e.bytes, 'external');
        } else {
          // A read that misses waits for the disk: the clock must run meanwhile.
          await untilDone(engine.read(e.offset, e.bytes), o.advance);
        }
      }
      // The clock may have run on while a request waited for the disk: go by the clock.
      t = Date.now() - start;
      const until = Math.min(o.durationMs, t + step, next < o.trace.length ? o.trace[next]!.at : Infinity);
      if (until > t) await o.advance(until - t);
      t = Math.max(until, Date.now() - start);
      observe();
    }
    scheduler.stop();
    await settle(scheduler, o.advance);
    const history = store.history;
    const flushes = history.flushes(start);
    const events: Record<string, number> = {};
    for (const e of history.events(start)) events[e.kind] = (events[e.kind] ?? 0) + 1;
    return {
      disk: disk.report(),
      diskState: disk.current,
      status: scheduler.status(),
      flushes: flushes.length,
      flushReasons,
      events,
      maxDirtyBytes: maxDirty,
      maxUnflushedMs: maxUnflushed,
      dirtyBytesAtEnd: dirtyBytes(),
      log,
    };
  } finally {
    scheduler?.stop();
    disk.close();
    await engine?.close().catch(() => undefined);
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * Waits for `work`, moving the clock 100 ms at a time while it waits (for the disk's spin-up, say).
 * (A race of work.then(() => true) against Promise.resolve(false) never sees the work end: the
 * settled false wins by one microtask every time, and the clock runs on forever.)
 */
async function untilDone(work: Promise<unknown>, advance: (ms: number) => Promise<unknown>): Promise<void> {
  let done = false;
  const settled = work.finally(() => (done = true));
  await advance(0); // a hit ends without the clock
  while (!done) await advance(100);
  await settled;
}

/** Lets a flush that is still running finish, moving the clock as it waits for the disk. */
async function settle(scheduler: FlushScheduler, advance: (ms: number) => Promise<unknown>): Promise<void> {
  let idle = false;
  void scheduler.idle().then(() => (idle = true));
  for (let i = 0; i < 600 && !idle; i++) await advance(100);
}
