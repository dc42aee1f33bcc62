// When to flush. One flush at a time (flushDirty: one epoch, sorted and coalesced), triggered by
//   schedule       the --flush cron expression
//   threshold      dirty bytes above --dirty-max
//   age            the oldest unflushed write older than --max-dirty-age
//   manual         `ulobdev flush DEVICE`
//   detach         detach and shutdown
//   opportunistic  the disk is spinning anyway (a cache miss read it, or it was seen awake)
//   ac             on mains power with --on-ac flush
//   retry          after a failed flush, with exponential backoff
//   budget         dirty data fills 3/4 of the cache budget (--cache-size), or a write waits for
//                  room that only a flush can make
//   room           the flash filesystem is full (another program filled it) and the cache holds
//                  only dirty blocks: a write waits while this flush runs on the flash reserve
// Nothing else makes the daemon touch the disk, so between flushes it can sleep. A failed flush
// leaves its blocks dirty (engine.abortEpoch); the error shows in status, logs and history.
import type { CronJob } from 'cron';
import type { Logger } from 'pino';
import type { CacheEngine } from '../cache/engine.js';
import type { HistoryLog } from '../cache/metadata.js';
import { flushDirty, type FlushProgress, type FlushResult } from './flusher.js';
import type { PowerControl, PowerState } from './power.js';
import { EngineClosedError } from '../errors.js';
import { cronModule } from './policy.js';
import { formatBytes } from '../units.js';

/** How long the history keeps flushes, samples and events (docs/reference.md, "report"). */
export const HISTORY_KEEP_MS = 90 * 86_400_000;

export type FlushReason = 'schedule' | 'threshold' | 'age' | 'manual' | 'detach' | 'opportunistic' | 'ac' | 'retry' | 'budget' | 'room';

/** Share of the cache budget dirty data may fill before a 'budget' flush starts. */
export const BUDGET_FLUSH_SHARE = 0.75;

export interface SchedulerOptions {
  /** Validated cron expression (policy.parseCron). */
  cron?: string;
  /** Emergency flush above this many dirty bytes. */
  dirtyMaxBytes?: number;
  /** Flush once the oldest unflushed write is this old. */
  maxDirtyAgeMs?: number;
  /** Put the disk in standby after each flush (see spindownIdleMs for a flush the disk was awake for). */
  spindown?: boolean;
  /**
   * With spindown: after an opportunistic flush (a miss or another program had woken the disk),
   * STANDBY waits until no miss has reached the disk for this long (default 10 min), so the next
   * misses of the same session find it spinning instead of waking it again; after a flush that
   * woke the disk itself, STANDBY follows at once. 0: always at once.
   */
  spindownIdleMs?: number;
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
  /**
   * Period of the history's pruning (default daily): rows older than HISTORY_KEEP_MS go, at
   * start() and then every pruneMs, so a daemon that runs for years keeps 90 days, not all.
   */
  pruneMs?: number;
  /** How often to read the disk's power state (CHECK POWER MODE does not wake a well-behaved disk). */
  powerPollMs?: number;
  /**
   * A CHECK POWER MODE that answers "awake" after this long, when the disk was asleep, spun it up
   * to answer (default 1500 ms; a spin-up takes seconds, an answer from a spinning disk a few ms).
   */
  selfWakeLatencyMs?: number;
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
  /** End (milliseconds since the epoch) and size of the last flush that wrote something, or null. */
  lastFlushAt: number | null;
  lastFlushBytes: number | null;
  /**
   * End of the last flush that found nothing dirty, when it came after lastFlushAt (a `ulobdev
   * flush` with nothing to write); else null. Such a flush does not replace the last one.
   */
  lastEmptyFlushAt: number | null;
  /**
   * A flush an earlier run of the daemon left cut (killed mid-flush, or failed) and no flush has
   * completed since: the disk holds part of its blocks, so it is not a consistent image until the
   * next flush completes. From the history at start; null once a flush completes.
   */
  cutFlush: { epoch: number; startedAt: number; error: string } | null;
  nextFlushAt: number | null;
  /** Time of the oldest write not yet on the disk (coarse: the start of the flush that missed it). */
  oldestDirtyAt: number | null;
  lastError: string | null;
  retryAt: number | null;
  failures: number;
  powerState: PowerState;
  /**
   * False once the disk proved to wake up to answer CHECK POWER MODE (a USB bridge that does so):
   * the daemon stops asking, and powerState is then what it presumes from the disk's I/O counters.
   */
  powerPolling: boolean;
  /** The disk spins up to answer CHECK POWER MODE (seen once; then never asked again). */
  powerQueryWakes: boolean;
  spinUpsToday: number;
  /** Spin-ups caused by a cache miss since attach (the disk was last seen in standby). */
  missSpinUps: number;
}

// spinup-caused: a flush of ours woke it; spinup-observed: another program did; spinup-self: a
// CHECK POWER MODE of ours did (once: then polling stops).
const SPINUP_KINDS = ['spinup-caused', 'spinup-observed', 'spinup-self'] as const;

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
  #lastEmptyFlushAt: number | null = null;
  #cutFlush: SchedulerStatus['cutFlush'] = null;
  #oldestDirtyAt: number | null = null;
  #lastError: string | null = null;
  #retryAt: number | null = null;
  #failures = 0;
  #powerState: PowerState = 'unknown';
  #opportunistic: NodeJS.Timeout | null = null;
  /** Armed after an opportunistic flush with spindown: STANDBY once the disk has been quiet. */
  #idleSpindown: NodeJS.Timeout | null = null;
  #onAc = false;
  #stopped = false;
  #standbyIgnoredWarned = false;
  /**
   * Set while the platters are believed stopped (a STANDBY of ours, or the disk said so) and no
   * access of ours happened since: the disk's I/O count then, to tell whether anyone touched it.
   */
  #asleep: { ios: number | null } | null = null;
  /** The disk spins up to answer CHECK POWER MODE: it is never asked again. */
  #queryWakes = false;
  /** Answers that looked like the query woke the disk (#check). */
  #wokenByQuery = 0;
  #missSpinUps = 0;

  constructor(engine: CacheEngine, options: SchedulerOptions) {
    this.#engine = engine;
    this.#o = options;
    this.#log = options.logger;
    if (options.cron) {
      // Constructed here so a bad expression throws before start() (parseCron checked it already).
      this.#job = cronModule().CronJob.from({ cronTime: options.cron, onTick: () => void this.#auto('schedule'), start: false });
    }
  }

  start(): void {
    const last = this.#o.history?.lastFlush();
    const wrote = last && last.blocks > 0 ? last : this.#o.history?.lastFlush({ wrote: true });
    this.#lastFlushAt = wrote?.endedAt ?? null;
    this.#lastFlushBytes = wrote?.bytes ?? null;
    this.#lastEmptyFlushAt = last && last !== wrote ? last.endedAt : null;
    const cut = this.#o.history?.lastCutFlush();
    this.#cutFlush = cut ? { epoch: cut.epoch, startedAt: cut.startedAt, error: cut.error ?? 'unknown' } : null;
    // Dirty blocks from an earlier run are at least as old as the last flush that left them.
    if (this.#dirtyBytes() > 0) this.#oldestDirtyAt = last?.startedAt ?? Date.now();
    this.#job?.start();
    this.#every(this.#o.tickMs ?? 1000, () => this.#tick());
    if (this.#o.history) {
      this.#prune();
      this.#every(this.#o.sampleMs ?? 60_000, () => this.#sample());
      this.#every(this.#o.pruneMs ?? 86_400_000, () => this.#prune());
    }
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
    this.#cancelIdleSpindown();
  }

  /**
   * Records the dirty bytes now in the history (a sample, as the minute's ones). The daemon calls
   * it last thing at detach: a cache detached with dirty data shows it in its report, where the
   * last sample was otherwise the one taken at attach or the last whole minute.
   */
  sampleNow(): void {
    this.#sample();
  }

  /**
   * Waits until no flush runs or is queued; returns the flushes it waited for that completed
   * (a failed one is left out: its error is in status and the history).
   */
  async idle(): Promise<FlushResult[]> {
    const done: FlushResult[] = [];
    while (this.#running || this.#queued) {
      const r = await (this.#queued ?? this.#running)!.catch(() => null);
      if (r) done.push(r);
    }
    return done;
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

  /**
   * A write waits for room in the cache budget that only a flush can make: flushes now (reason
   * 'budget', or 'room': the flash filesystem is full and the cache holds only dirty blocks),
   * whatever the schedule and the retry backoff say. Rejects if the flush fails.
   */
  pressure(reason: 'budget' | 'room' = 'budget'): Promise<FlushResult> {
    if (this.#stopped) return Promise.reject(new EngineClosedError('the daemon is detaching: no flush will make room'));
    return this.request(reason);
  }

  /**
   * The disk was read (a cache miss): it spins now. If it was last seen in standby the miss woke
   * it (counted, and an event in the history); then flush dirty data while it spins.
   */
  noteDiskActive(): void {
    this.#asleep = null;
    // The session that woke the disk goes on: its quiet time starts again.
    if (this.#idleSpindown) this.#armIdleSpindown();
    if (this.#powerState === 'standby' || this.#powerState === 'sleep') {
      this.#missSpinUps++;
      this.#powerState = 'active';
      this.#event('spinup-caused', 'miss');
    }
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
      lastEmptyFlushAt: this.#lastEmptyFlushAt,
      cutFlush: this.#cutFlush,
      nextFlushAt: next ? next.toMillis() : null,
      oldestDirtyAt: this.#dirtyBytes() > 0 ? (this.#oldestDirtyAt ?? Date.now()) : null,
      lastError: this.#lastError,
      retryAt: this.#retryAt,
      failures: this.#failures,
      powerState: this.#powerState,
      powerPolling: Boolean(this.#o.power?.supported) && !this.#queryWakes,
      powerQueryWakes: this.#queryWakes,
      spinUpsToday: this.#o.history?.countEvents(startOfToday(), SPINUP_KINDS) ?? 0,
      missSpinUps: this.#missSpinUps,
    };
  }

  // --- internals ------------------------------------------------------------------------------

  #every(ms: number, fn: () => void): void {
    const t = setInterval(fn, ms);
    t.unref();
    this.#timers.push(t);
  }

  #dirtyBytes(): number {
    const g = this.#engine.geometry;
    return Math.min(this.#engine.dirtyBlocks() * g.blockSize, g.size);
  }

  /** Dirty bytes that take cache space (zeroed blocks take none). */
  #dirtyDataBytes(): number {
    // The engine's count: on /dev/uloopN the kernel's exact one (it holds dirty blocks the store
    // learns of only at the next barrier).
    return this.#engine.dirtyDataBlocks() * this.#engine.geometry.blockSize;
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
    const budget = this.#engine.store.budget;
    if (budget !== null && this.#dirtyDataBytes() >= budget * BUDGET_FLUSH_SHARE) void this.#auto('budget');
    else if (this.#o.dirtyMaxBytes !== undefined && dirty >= this.#o.dirtyMaxBytes) void this.#auto('threshold');
    else if (this.#o.maxDirtyAgeMs !== undefined && now - this.#oldestDirtyAt >= this.#o.maxDirtyAgeMs) void this.#auto('age');
    else if (this.#onAc && now - this.#engine.lastRequestAt >= (this.#o.quietMs ?? 5000)) void this.#auto('ac');
  }

  #prune(): void {
    try {
      this.#o.history?.prune(Date.now() - HISTORY_KEEP_MS);
    } catch (err) {
      this.#log.warn(`cannot prune the history: ${(err as Error).message}`);
    }
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
    if (this.#queryWakes) return this.#watchIo();
    const before = this.#powerState;
    const check = await this.#check().catch(() => null);
    if (!check) return;
    // Woken by our own question: it spins now anyway, so dirty data may as well go.
    if (check.selfWoken) return this.noteDiskActive();
    const state = check.state;
    const awake = state === 'active' || state === 'idle';
    if (awake && (before === 'standby' || before === 'sleep')) {
      // Someone else woke it (not a flush of ours: those run with polling paused).
      this.#event('spinup-observed');
      this.noteDiskActive();
    } else if (!awake && state !== 'unknown' && before !== state && (before === 'active' || before === 'idle')) {
      this.#event('standby', 'observed');
    }
  }

  /**
   * CHECK POWER MODE, watched for a disk that wakes up to answer it: asked while it was asleep
   * (and nobody accessed it since, by its I/O count), it answers "awake", and slowly (a spin-up)
   * or with its I/O count unchanged. Then the query woke it: counted as a self-caused spin-up,
   * logged once, and the disk is never asked again (#watchIo instead).
   */
  async #check(options: { readback?: boolean } = {}): Promise<{ state: PowerState; selfWoken: boolean }> {
    const power = this.#o.power!;
    const asleep = this.#asleep;
    const t0 = Date.now();
    const state = await power.state();
    const latency = Date.now() - t0;
    const awake = state === 'active' || state === 'idle';
    const ios = await this.#ioCount();
    this.#powerState = state;
    // The question woke it when it answers "awake" slowly (a spin-up takes seconds, an answer from
    // a spinning disk milliseconds) and at once when asked again (a busy machine or disk makes both
    // slow); or when it was asleep by our account and nobody has accessed it since (not right
    // after our own STANDBY: a disk that ignored it is untouched and awake too). Two such answers
    // are proof; one could be chance.
    const limit = this.#o.selfWakeLatencyMs ?? 1500;
    let woke = false;
    if (awake && latency >= limit) {
      const t1 = Date.now();
      const again = await power.state().catch(() => 'unknown' as const);
      woke = (again === 'active' || again === 'idle') && Date.now() - t1 < limit / 3;
    }
    if (!options.readback && awake && asleep !== null && asleep.ios !== null && ios !== null && ios === asleep.ios) woke = true;
    if (woke && ++this.#wokenByQuery >= 2) {
      this.#asleep = null;
      this.#selfWoken(latency);
      return { state, selfWoken: true };
    }
    if (awake) this.#asleep = null;
    else if (state === 'standby' || state === 'sleep') this.#asleep ??= { ios };
    return { state, selfWoken: false };
  }

  #selfWoken(latencyMs: number): void {
    this.#event('spinup-self', 'CHECK POWER MODE');
    if (this.#queryWakes) return;
    this.#queryWakes = true;
    this.#event('query-wakes', `answered after ${latencyMs} ms`);
    this.#log.warn(
      `the disk spun up to answer CHECK POWER MODE (answered after ${(latencyMs / 1000).toFixed(1)} s; a USB bridge that wakes the drive to read its state?): ` +
        'no longer asking it; its state is presumed from its I/O counters and spin-ups are counted from them',
    );
  }

  /** Without queries (#queryWakes): the disk's I/O count tells whether anyone else woke it. */
  async #watchIo(): Promise<void> {
    const asleep = this.#asleep;
    if (!asleep) return;
    const ios = await this.#ioCount();
    if (ios === null || asleep.ios === null || ios === asleep.ios) return;
    this.#asleep = null;
    this.#powerState = 'active';
    this.#event('spinup-observed', 'I/O counters');
    this.noteDiskActive();
  }

  async #ioCount(): Promise<number | null> {
    return (await this.#o.power?.ioCount?.().catch(() => null)) ?? null;
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
        if (this.#queryWakes) {
          // Never asked: asleep by our account and untouched since (its I/O count) means we wake it.
          const asleep = this.#asleep;
          const ios = await this.#ioCount();
          spunUp = asleep !== null && (asleep.ios === null || ios === null || asleep.ios === ios);
        } else {
          const check = await this.#check();
          spunUp = check.selfWoken || check.state === 'standby' || check.state === 'sleep';
        }
        if (spunUp) this.#event('spinup-caused', reason);
      } catch {
        // Unknown power state: not counted.
      }
      this.#asleep = null;
    }
    // The dirty bytes just before the flush: with samples only every minute and after flushes, a
    // day's chart would never show how much each flush took away.
    this.#sample();
    let row: number | undefined;
    try {
      row = history?.flushStarted(this.#engine.store.info.flushEpoch + 1, startedAt, reason);
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
      if (result.blocks > 0) {
        this.#lastFlushAt = endedAt;
        this.#lastFlushBytes = result.bytes;
        this.#lastEmptyFlushAt = null;
      } else {
        // Nothing was dirty: status keeps showing the last flush that wrote something.
        this.#lastEmptyFlushAt = endedAt;
      }
      this.#lastError = null;
      this.#cutFlush = null;
      this.#retryAt = null;
      this.#failures = 0;
      // Whatever is still dirty was written after this flush began.
      this.#oldestDirtyAt = this.#dirtyBytes() > 0 ? startedAt : null;
      if (row !== undefined) this.#safe(() => history!.flushEnded(row!, { endedAt, bytes: result.bytes, blocks: result.blocks, spunUp }));
      // The journal shows the message alone (no fields): it says what laptop.md promises there.
      const what = `${formatBytes(result.bytes)} in ${endedAt - startedAt} ms (${reason}${spunUp ? '; the disk spun up for it' : ''})`;
      this.#log.info({ reason, ...result, ms: endedAt - startedAt, spunUp }, `flushed dirty blocks to the backing disk: ${what}`);
      if (power?.supported) this.#powerState = 'active';
      if (this.#o.spindown && power?.supported) {
        const idleMs = this.#o.spindownIdleMs ?? 10 * 60_000;
        if (reason === 'opportunistic' && !spunUp && idleMs > 0) this.#armIdleSpindown();
        else await this.#spindown();
      }
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

  /** (Re)starts the quiet-time countdown to STANDBY after an opportunistic flush. */
  #armIdleSpindown(): void {
    this.#cancelIdleSpindown();
    if (this.#stopped) return;
    this.#idleSpindown = setTimeout(() => {
      this.#idleSpindown = null;
      // A flush running now ends with its own decision.
      if (!this.#stopped && !this.#running) void this.#spindown();
    }, this.#o.spindownIdleMs ?? 10 * 60_000);
    this.#idleSpindown.unref();
  }

  #cancelIdleSpindown(): void {
    if (this.#idleSpindown) clearTimeout(this.#idleSpindown);
    this.#idleSpindown = null;
  }

  async #spindown(): Promise<void> {
    this.#cancelIdleSpindown();
    try {
      await this.#o.power!.standby();
    } catch (err) {
      this.#log.warn(`cannot put the disk in standby: ${(err as Error).message}`);
      return;
    }
    this.#asleep = { ios: await this.#ioCount() };
    if (this.#queryWakes) {
      // Reading the state back would wake it again: take the command's word.
      this.#powerState = 'standby';
      this.#event('standby', 'after flush');
      return;
    }
    // Believe the disk, not the command: some drives and bridges accept STANDBY IMMEDIATE and stay
    // up. Reporting standby then would turn the next poll into a false spin-up (and a flush). But
    // a disk that answered slowly did spin down: the question woke it (#check says so).
    const check = await this.#check({ readback: true }).catch(() => ({ state: 'unknown' as PowerState, selfWoken: false }));
    if (check.selfWoken) return;
    const state = check.state;
    if (state === 'active' || state === 'idle') {
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
