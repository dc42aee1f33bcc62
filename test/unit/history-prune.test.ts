// newuser11 finding 2: the history was pruned only at attach, so a daemon left running for years
// kept every dirty-bytes sample (525k rows a year). The scheduler prunes at start and then daily:
// rows older than 90 days go while it runs. Fake timers and clock; a real metadata file.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import type { CacheEngine } from '../../src/cache/engine.js';
import { Metadata } from '../../src/cache/metadata.js';
import { FlushScheduler, HISTORY_KEEP_MS } from '../../src/writeback/scheduler.js';

const DAY = 86_400_000;
let dir: string;
let meta: Metadata;
let sched: FlushScheduler | null = null;

beforeEach(() => {
  vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout', 'setInterval', 'clearInterval', 'Date'], now: new Date('2026-03-02T09:00:00Z') });
  dir = mkdtempSync(join(tmpdir(), 'ulob-history-prune-'));
  meta = Metadata.create(join(dir, 'c.meta'), { uuid: 'u', blockSize: 4096, backingSize: 1 << 30, backingId: 'file:test' }, 'writeback');
});

afterEach(() => {
  sched?.stop();
  sched = null;
  meta.close();
  vi.useRealTimers();
  rmSync(dir, { recursive: true, force: true });
});

/** An engine with nothing dirty: the scheduler only samples and prunes. */
const idleEngine = {
  geometry: { blockSize: 4096, size: 1 << 30 },
  dirtyBlocks: () => 0,
  dirtyDataBlocks: () => 0,
  store: { budget: null },
  lastRequestAt: 0,
} as unknown as CacheEngine;

function start(): void {
  // Ticks and samples far apart (under setInterval's 2^31 ms): the test is about the prune timer.
  sched = new FlushScheduler(idleEngine, { history: meta, logger: pino({ level: 'silent' }), tickMs: 20 * DAY, sampleMs: 20 * DAY });
  sched.start();
}

/** The samples of the start (the ones the test follows; the scheduler adds one every 20 days). */
const sampleTimes = (upTo: number) => meta.dirtySamples(0).map((s) => s.at).filter((t) => t <= upTo);

describe('the history while the daemon runs', () => {
  it('keeps 90 days: pruned at start, then daily, not only at the next attach', async () => {
    expect(HISTORY_KEEP_MS).toBe(90 * DAY);
    const t0 = Date.now();
    meta.addDirtySample(t0 - 100 * DAY, 1);
    meta.addDirtySample(t0 - DAY, 2);
    meta.addEvent(t0 - 100 * DAY, 'spinup-observed');
    start();
    // At start: the 100-day-old rows are gone; start() took a sample of its own.
    expect(sampleTimes(t0)).toEqual([t0 - DAY, t0]);
    expect(meta.events(0)).toEqual([]);
    // 88 days on, the day-old sample is 89 days old: kept.
    await vi.advanceTimersByTimeAsync(88 * DAY);
    expect(sampleTimes(t0)).toEqual([t0 - DAY, t0]);
    // 91 days on, without a restart: both are past 90 days and gone.
    await vi.advanceTimersByTimeAsync(3 * DAY);
    expect(sampleTimes(t0)).toEqual([]);
  });
});
