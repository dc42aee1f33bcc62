// When to flush. One flush at a time (flushDirty: one epoch, sorted and coalesced), triggered by
//   schedule       the --flush cron expression
//   threshold      dirty bytes above --dirty-max
//   age            the oldest unflushed write older than --max-dirty-age
//   manual         `ulobdev flush DEVICE`
//   detach         detach and shutdown
//   opportunistic  the disk is spinning anyway (a cache miss read it, or it was seen awake)
//   ac             on mains power with --on-ac flush
//   retry          after a failed flush, with exponential backoff
// Nothing else makes the daemon touch the disk, so between flushes it can sleep. A failed flush
// leaves its blocks dirty (engine.abortEpoch); the error shows in status, logs and history.
import { CronJob } from 'cron';
import type { Logger } from 'pino';
import type { CacheEngine } from '../cache/engine.js';
import type { HistoryLog } from '../cache/metadata.js';
import { flushDirty, type FlushProgress, type FlushResult } from './flusher.js';
import type { PowerControl, PowerState } from './power.js';

export type FlushReason = 'schedule' | 'threshold' | 'age' | 'manual' | 'detach' | 'opportunistic' | 'ac' | 'retry';

export interface SchedulerOptions {
  /** Validated cron expression (policy.parseCron). */
  cron?: string;
  /** Emergency flush above this many dirty bytes. */
  dirtyMaxBytes?: number;
  /** Flush once the oldest unflushed write is this old. */
  maxDirtyAgeMs?: number;
  /** Put the disk in standby after each flush. */
  spindown?: boolean;
  /** On mains power: flush as soon as the device is quiet ('flush') or keep the schedule. */
  onAc?: 'flush' | 'schedule';
  /** Reads whether the machine runs on mains power (policy: power.onAcPower). */
  acPower?: () => Promise<boolean>;
  power?: PowerControl;
  history?: HistoryLog;
  logger: Logger;
  /** Period of the threshold/age/retry checks. */
  tickMs?: number;
  /** Period of dirty-bytes samples in the history. */
  sampleMs?: number;
  /** How often to read the disk's power state (CHECK POWER MODE does not wake it). */
  powerPollMs?: number;
  /** First retry delay after a failed flush; doubles up to maxBackoffMs. */
  backoffMs?: number;
  maxBackoffMs?: number;
  /** How long the disk must have been quiet of user requests before an 'ac' flush. */
  quietMs?: number;
  flushOptions?: { maxIoBytes?: number };
  /**
   * Flush while the disk spins for another reason (default true). Off when no automatic trigger
   * is set: then writes stay on flash until `ulobdev flush`, as the user asked.
   */
  opportunistic?: boolean;
}

export interface SchedulerStatus {
  flushing: boolean;
  reason: FlushReason | null;
  progress: FlushProgress | null;
  /** Milliseconds since the epoch, or null. */
  lastFlushAt: number | null;
  lastFlushBytes: number | null;
  nextFlushAt: number | null;
  /** Time of the oldest write not yet on the disk (coarse: the start of the flush that missed it). */
  oldestDirtyAt: number | null;
  lastError: string | null;
  retryAt: number | null;
  failures: number;
  powerState: PowerState;
  spinUpsToday: number;
}

const SPINUP_KINDS = ['spinup-caused', 'spinup-observed'] as const;

export class FlushScheduler {
  readonly #engine: CacheEngine;
  readonly #o: SchedulerOptions;
  readonly #log: Logger;
  #job: CronJob | null = null;
  #timers: NodeJS.Timeout[] = [];
  #running: Promise<FlushResult> | null = null;
  #queued: Promise<FlushResult> | null = null;
  #reason: FlushReason | null = null;
  #progress: FlushProgress | null = null;
  #lastFlushAt: number | null = null;
  #lastFlushBytes: number | null = null;
  #oldestDirtyAt: number | null = null;
  #lastError: string | null = null;
  #retryAt: number | null = null;
  #failures = 0;
  #powerState: PowerState = 'unknown';
  #opportunistic: NodeJS.Timeout | null = null;
  #onAc = false;
  #stopped = false;
  #standbyIgnoredWarned = false;

  constructor(engine: CacheEngine, options: SchedulerOptions) {
    this.#engine = engine;
    this.#o = options;
    this.#log = options.logger;
    if (options.cron) {
      // Constructed here so a bad expression throws before start() (parseCron checked it already).
      this.#job = CronJob.from({ cronTime: options.cron, onTick: () => void this.#auto('schedule'), start: false });
    }
  }

  start(): void {
    const last = this.#o.history?.lastFlush();
    this.#lastFlushAt = last?.endedAt ?? null;
    this.#lastFlushBytes = last?.bytes ?? null;
    // Dirty blocks from an earlier run are at least as old as the last flush that left them.
    if (this.#dirtyBytes() > 0) this.#oldestDirtyAt = last?.startedAt ?? Date.now();
    this.#job?.start();
    this.#every(this.#o.tickMs ?? 1000, () => this.#tick());
    if (this.#o.history) this.#every(this.#o.sampleMs ?? 60_000, () => this.#sample());
    if (this.#o.power?.supported) {
      void this.#pollPower();
      this.#every(this.#o.powerPollMs ?? 60_000, () => void this.#pollPower());
    }
    if (this.#o.onAc === 'flush' && this.#o.acPower) {
      const check = () => void this.#o.acPower!().then((ac) => (this.#onAc = ac)).catch(() => undefined);
      check();
      this.#every(30_000, check);
    }
    this.#sample();
  }

  /** Stops every trigger; a flush in progress runs to its end (await idle()). */
  stop(): void {
    this.#stopped = true;
    this.#job?.stop();
    for (const t of this.#timers) clearInterval(t);
    this.#timers = [];
    if (this.#opportunistic) clearTimeout(this.#opportunistic);
  }

  async idle(): Promise<void> {
    while (this.#running || this.#queued) await (this.#queued ?? this.#running)!.catch(() => undefined);
  }

  get flushing(): boolean {
    return this.#running !== null;
  }

  /**
   * Flushes now. While a flush runs, one more is queued behind it (its snapshot may predate the
   * caller's writes); every caller waiting meanwhile shares that one.
   */
  request(reason: FlushReason, options: { signal?: AbortSignal } = {}): Promise<FlushResult> {
    if (!this.#running) return this.#start(reason, options);
    this.#queued ??= this.#running
      .catch(() => undefined)
      .then(() => {
        this.#queued = null;
        return this.request(reason, options);
      });
    return this.#queued;
  }

  /** The disk is awake for another reason (a miss read it): flush dirty data while it spins. */
  noteDiskActive(): void {
    if (this.#o.opportunistic === false || this.#stopped || this.#opportunistic || this.#dirtyBytes() === 0) return;
    // Shortly after, so the reads that woke it go first.
    this.#opportunistic = setTimeout(() => {
      this.#opportunistic = null;
      void this.#auto('opportunistic');
    }, 1000);
    this.#opportunistic.unref();
  }

  status(): SchedulerStatus {
    const next = this.#job?.nextDate();
    return {
      flushing: this.#running !== null,
      reason: this.#reason,
      progress: this.#progress,
      lastFlushAt: this.#lastFlushAt,
      lastFlushBytes: this.#lastFlushBytes,
      nextFlushAt: next ? next.toMillis() : null,
      oldestDirtyAt: this.#dirtyBytes() > 0 ? (this.#oldestDirtyAt ?? Date.now()) : null,
      lastError: this.#lastError,
      retryAt: this.#retryAt,
      failures: this.#failures,
      powerState: this.#powerState,
      spinUpsToday: this.#o.history?.countEvents(startOfToday(), SPINUP_KINDS) ?? 0,
    };
  }

  // --- internals ------------------------------------------------------------------------------

  #every(ms: number, fn: () => void): void {
    const t = setInterval(fn, ms);
    t.unref();
    this.#timers.push(t);
  }

  #dirtyBytes(): number {
    const s = this.#engine.store;
    return Math.min(s.dirty.count() * s.geometry.blockSize, s.geometry.size);
  }

  /** Automatic triggers: skipped while nothing is dirty, a flush runs, or a retry is pending. */
  async #auto(reason: FlushReason): Promise<void> {
    if (this.#stopped || this.#running || this.#dirtyBytes() === 0) return;
    if (reason !== 'schedule' && reason !== 'retry' && this.#retryAt !== null) return;
    await this.#start(reason).catch(() => undefined);
  }

  #tick(): void {
    const dirty = this.#dirtyBytes();
    const now = Date.now();
    if (dirty === 0) {
      this.#oldestDirtyAt = null;
      return;
    }
    this.#oldestDirtyAt ??= now;
    if (this.#running) return;
    if (this.#retryAt !== null) {
      if (now >= this.#retryAt) void this.#auto('retry');
      return;
    }
    if (this.#o.dirtyMaxBytes !== undefined && dirty >= this.#o.dirtyMaxBytes) void this.#auto('threshold');
    else if (this.#o.maxDirtyAgeMs !== undefined && now - this.#oldestDirtyAt >= this.#o.maxDirtyAgeMs) void this.#auto('age');
    else if (this.#onAc && now - this.#engine.lastRequestAt >= (this.#o.quietMs ?? 5000)) void this.#auto('ac');
  }

  #sample(): void {
    try {
      this.#o.history?.addDirtySample(Date.now(), this.#dirtyBytes());
    } catch (err) {
      this.#log.warn(`cannot record a dirty-bytes sample: ${(err as Error).message}`);
    }
  }

  #event(kind: string, detail?: string): void {
    try {
      this.#o.history?.addEvent(Date.now(), kind, detail ?? null);
    } catch (err) {
      this.#log.warn(`cannot record a ${kind} event: ${(err as Error).message}`);
    }
  }

  async #pollPower(): Promise<void> {
    const power = this.#o.power;
    if (!power?.supported || this.#running) return;
    let state: PowerState;
    try {
      state = await power.state();
    } catch {
      return;
    }
    const before = this.#powerState;
    this.#powerState = state;
    const awake = state === 'active' || state === 'idle';
    if (awake && (before === 'standby' || before === 'sleep')) {
      // Someone else woke it (not a flush of ours: those run with polling paused).
      this.#event('spinup-observed');
      this.noteDiskActive();
    } else if (!awake && state !== 'unknown' && before !== state && (before === 'active' || before === 'idle')) {
      this.#event('standby', 'observed');
    }
  }

  #start(reason: FlushReason, options: { signal?: AbortSignal } = {}): Promise<FlushResult> {
    const run = this.#flush(reason, options.signal);
    this.#running = run;
    const clear = () => {
      if (this.#running === run) this.#running = null;
    };
    run.then(clear, clear);
    return run;
  }

  async #flush(reason: FlushReason, signal?: AbortSignal): Promise<FlushResult> {
    this.#reason = reason;
    const startedAt = Date.now();
    const history = this.#o.history;
    let spunUp = false;
    const power = this.#o.power;
    if (power?.supported) {
      try {
        const state = await power.state();
        spunUp = state === 'standby' || state === 'sleep';
        if (spunUp) this.#event('spinup-caused', reason);
      } catch {
        // Unknown power state: not counted.
      }
    }
    let row: number | undefined;
    try {
      row = history?.flushStarted(this.#engine.store.info.flushEpoch + 1, startedAt);
    } catch (err) {
      this.#log.warn(`cannot record the flush in the history: ${(err as Error).message}`);
    }
    try {
      const result = await flushDirty(this.#engine, {
        ...this.#o.flushOptions,
        signal,
        onStart: (p) => (this.#progress = p),
        onProgress: (p) => (this.#progress = p),
      });
      const endedAt = Date.now();
      this.#lastFlushAt = endedAt;
      this.#lastFlushBytes = result.bytes;
      this.#lastError = null;
      this.#retryAt = null;
      this.#failures = 0;
      // Whatever is still dirty was written after this flush began.
      this.#oldestDirtyAt = this.#dirtyBytes() > 0 ? startedAt : null;
      if (row !== undefined) this.#safe(() => history!.flushEnded(row!, { endedAt, bytes: result.bytes, blocks: result.blocks, spunUp }));
      this.#log.info({ reason, ...result, ms: endedAt - startedAt, spunUp }, 'flushed dirty blocks to the backing disk');
      if (power?.supported) this.#powerState = 'active';
      if (this.#o.spindown && power?.supported) await this.#spindown();
      this.#sample();
      return result;
    } catch (err) {
      const message = (err as Error).message;
      this.#failures++;
      const delay = Math.min((this.#o.backoffMs ?? 10_000) * 2 ** (this.#failures - 1), this.#o.maxBackoffMs ?? 15 * 60_000);
      this.#retryAt = Date.now() + delay;
      this.#lastError = message;
      if (row !== undefined) this.#safe(() => history!.flushEnded(row!, { endedAt: Date.now(), bytes: this.#progress?.doneBytes ?? 0, blocks: 0, spunUp, error: message }));
      this.#log.error({ reason, failures: this.#failures, retryInMs: delay }, `flush failed, blocks stay dirty: ${message}`);
      throw err;
    } finally {
      this.#progress = null;
      this.#reason = null;
    }
  }

  async #spindown(): Promise<void> {
    try {
      await this.#o.power!.standby();
    } catch (err) {
      this.#log.warn(`cannot put the disk in standby: ${(err as Error).message}`);
      return;
    }
    // Believe the disk, not the command: some drives and bridges accept STANDBY IMMEDIATE and stay
    // up. Reporting standby then would turn the next poll into a false spin-up (and a flush).
    const state = await this.#o.power!.state().catch(() => 'unknown' as const);
    if (state === 'active' || state === 'idle') {
      this.#powerState = state;
      if (!this.#standbyIgnoredWarned) {
        this.#standbyIgnoredWarned = true;
        this.#log.warn('the disk accepted STANDBY IMMEDIATE but still reports itself active; it does not spin down on command');
      }
      this.#event('standby-ignored', 'after flush');
      return;
    }
    this.#powerState = state === 'unknown' ? 'standby' : state;
    this.#event('standby', 'after flush');
  }

  #safe(fn: () => void): void {
    try {
      fn();
    } catch (err) {
      this.#log.warn(`cannot record the flush in the history: ${(err as Error).message}`);
    }
  }
}

function startOfToday(): number {
  const d = new Date();
  d.setHours(0, 0, 0, 0);
  return d.getTime();
}
