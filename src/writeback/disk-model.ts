// A hard disk's power behaviour, simulated, for tests and bench/power.js: QEMU's emulated disks
// ignore STANDBY and always answer "active", so the scheduler's power logic cannot be watched on
// them. The model has the three ATA power states a spinning disk goes through (ACS-4, "power
// management": active, idle, standby), its own standby timer (as set by hdparm -S / IDLE with a
// count), a spin-up on any media access from standby (which takes spinUpMs), and the quirks users
// of hd-idle, hdparm and smartmontools report:
//   checkWakes      CHECK POWER MODE itself spins the disk up (some USB-SATA bridges read the
//                   drive's state by waking it) and then answers "active"
//   standbyIgnored  STANDBY IMMEDIATE is accepted and does nothing
//   slowAnswerMs    every CHECK POWER MODE takes this long (a busy bus or machine), waking nothing
// It implements PowerControl, so the real FlushScheduler drives it; a Source wrapped with
// diskModelSource sends every read and write through it. Timers are setTimeout/Date.now, so a
// fake clock (vitest's, @sinonjs/fake-timers) runs a simulated day in seconds.
import type { Source, WritableSource } from '../source/source.js';
import { isWritable } from '../source/source.js';
import type { PowerControl, PowerState } from './power.js';

export interface DiskModelOptions {
  /** The drive's own standby timer (hdparm -S), ms after the last media access; 0: off. Default 0. */
  standbyTimeoutMs?: number;
  /** From active to idle (heads unloaded, still spinning) after this long without access. Default 5 s. */
  idleAfterMs?: number;
  /** How long a spin-up takes; an access or a waking query waits this long. Default 6 s. */
  spinUpMs?: number;
  quirks?: { checkWakes?: boolean; standbyIgnored?: boolean; slowAnswerMs?: number };
}

/** Why the disk spun up: a read or write of ours, a CHECK POWER MODE (quirk), or another program. */
export type SpinUpCause = 'read' | 'write' | 'check' | 'external';

export interface DiskModelReport {
  spinUps: number;
  spinUpsBy: Record<SpinUpCause, number>;
  /** Milliseconds spent in each state. */
  ms: { active: number; idle: number; standby: number };
  /** Media accesses (reads and writes, ours and others'). */
  accesses: number;
  bytesRead: number;
  bytesWritten: number;
  /** STANDBY IMMEDIATE commands received (accepted, whether or not obeyed). */
  standbyCommands: number;
  checks: number;
}

type ModelState = 'active' | 'idle' | 'standby';

export class DiskModel implements PowerControl {
  readonly supported = true;
  readonly #o: Required<Omit<DiskModelOptions, 'quirks'>> & { quirks: NonNullable<DiskModelOptions['quirks']> };
  #state: ModelState = 'active';
  #since: number;
  #spinningUp: Promise<void> | null = null;
  #idleTimer: NodeJS.Timeout | null = null;
  #standbyTimer: NodeJS.Timeout | null = null;
  readonly #ms = { active: 0, idle: 0, standby: 0 };
  readonly #spinUpsBy: Record<SpinUpCause, number> = { read: 0, write: 0, check: 0, external: 0 };
  /** Every spin-up: when, and why. */
  readonly spinUpLog: Array<{ at: number; cause: SpinUpCause }> = [];
  #accesses = 0;
  #bytesRead = 0;
  #bytesWritten = 0;
  #standbyCommands = 0;
  #checks = 0;

  constructor(options: DiskModelOptions = {}) {
    this.#o = {
      standbyTimeoutMs: options.standbyTimeoutMs ?? 0,
      idleAfterMs: options.idleAfterMs ?? 5000,
      spinUpMs: options.spinUpMs ?? 6000,
      quirks: options.quirks ?? {},
    };
    this.#since = Date.now();
    this.#armTimers();
  }

  /** The state now (what the platters do, whatever a query would say). */
  get current(): ModelState {
    return this.#state;
  }

  /** A media access: spins the disk up from standby (waiting spinUpMs), then restarts its timers. */
  async access(kind: 'read' | 'write', bytes: number, cause: SpinUpCause = kind): Promise<void> {
    await this.#wake(cause);
    this.#accesses++;
    if (kind === 'read') this.#bytesRead += bytes;
    else this.#bytesWritten += bytes;
    this.#enter('active');
    this.#armTimers();
  }

  /** CHECK POWER MODE. With the checkWakes quirk a disk in standby spins up first and says active. */
  async state(): Promise<PowerState> {
    this.#checks++;
    if (this.#o.quirks.slowAnswerMs) await new Promise((r) => setTimeout(r, this.#o.quirks.slowAnswerMs));
    if (this.#state === 'standby' && this.#o.quirks.checkWakes) {
      await this.#wake('check');
      this.#enter('active');
      this.#armTimers();
    }
    return this.#state;
  }

  /** STANDBY IMMEDIATE: spins down at once, unless the standbyIgnored quirk drops it. */
  async standby(): Promise<void> {
    this.#standbyCommands++;
    if (this.#o.quirks.standbyIgnored) return;
    await this.#spinningUp;
    this.#clearTimers();
    this.#enter('standby');
  }

  /** IDLE with a count (hdparm -S): the drive's own standby timer; 0 turns it off. */
  async setStandbyTimer(seconds: number): Promise<void> {
    this.#o.standbyTimeoutMs = seconds * 1000;
    if (this.#state !== 'standby') this.#armTimers();
  }

  /** Media accesses so far (what /proc/diskstats counts for a real disk). */
  async ioCount(): Promise<number> {
    return this.#accesses;
  }

  /** Totals up to now. */
  report(): DiskModelReport {
    const ms = { ...this.#ms };
    ms[this.#state] += Date.now() - this.#since;
    const spinUpsBy = { ...this.#spinUpsBy };
    return {
      spinUps: Object.values(spinUpsBy).reduce((a, b) => a + b, 0),
      spinUpsBy,
      ms,
      accesses: this.#accesses,
      bytesRead: this.#bytesRead,
      bytesWritten: this.#bytesWritten,
      standbyCommands: this.#standbyCommands,
      checks: this.#checks,
    };
  }

  /** Stops the model's timers (the end of a simulation). */
  close(): void {
    this.#clearTimers();
  }

  async #wake(cause: SpinUpCause): Promise<void> {
    if (this.#spinningUp) return this.#spinningUp;
    if (this.#state !== 'standby') return;
    this.#spinUpsBy[cause]++;
    this.spinUpLog.push({ at: Date.now(), cause });
    this.#clearTimers();
    this.#enter('active');
    this.#spinningUp = new Promise<void>((resolve) => setTimeout(resolve, this.#o.spinUpMs)).finally(() => (this.#spinningUp = null));
    return this.#spinningUp;
  }

  #enter(state: ModelState): void {
    const now = Date.now();
    this.#ms[this.#state] += now - this.#since;
    this.#since = now;
    this.#state = state;
  }

  #clearTimers(): void {
    if (this.#idleTimer) clearTimeout(this.#idleTimer);
    if (this.#standbyTimer) clearTimeout(this.#standbyTimer);
    this.#idleTimer = this.#standbyTimer = null;
  }

  #armTimers(): void {
    this.#clearTimers();
    this.#idleTimer = setTimeout(() => {
      if (this.#state === 'active') this.#enter('idle');
    }, this.#o.idleAfterMs);
    this.#idleTimer.unref?.();
    if (this.#o.standbyTimeoutMs > 0) {
      this.#standbyTimer = setTimeout(() => this.#enter('standby'), this.#o.standbyTimeoutMs);
      this.#standbyTimer.unref?.();
    }
  }
}

/** `source` with every read and write going through the disk model first (spin-ups, timers). */
export function diskModelSource(source: Source, disk: DiskModel): Source {
  const wrapped: Source = {
    size: source.size,
    id: source.id,
    description: source.description,
    readAt: async (buf, position) => {
      await disk.access('read', buf.byteLength);
      return source.readAt(buf, position);
    },
    close: () => source.close(),
  };
  if (isWritable(source)) {
    const w = source as WritableSource;
    Object.assign(wrapped, {
      writeAt: async (buf: Uint8Array, position: number) => {
        await disk.access('write', buf.byteLength);
        return w.writeAt(buf, position);
      },
      sync: () => w.sync(),
    });
  }
  return wrapped;
}
