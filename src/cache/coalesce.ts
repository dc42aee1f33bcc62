// Group commit: many callers asking "make everything before now durable" share one execution.
// A caller arriving while a run is under way cannot be served by it (its data may have been
// written after that run started), so it joins the next run, which all such callers share.

export class Coalescer {
  readonly #task: () => Promise<void>;
  readonly #gate: (() => Promise<void> | null) | null;
  #running: Promise<void> | null = null;
  #next: Promise<void> | null = null;

  /**
   * `gate`, when given, is asked before every run starts (whether queued behind a finished run or
   * asked for while none ran): null starts the run now; a promise delays the start until it
   * settles (it must settle, and never reject), and every caller arriving meanwhile joins that run.
   * It only moves a run's start later; it never lets a caller be served by a run that started
   * before the call.
   */
  constructor(task: () => Promise<void>, gate?: () => Promise<void> | null) {
    this.#task = task;
    this.#gate = gate ?? null;
  }

  /** Resolves after a run of the task that started after this call has finished. */
  run(): Promise<void> {
    // A queued run has not started yet, so it can serve this caller too. Checked first: between a
    // run's end and the queued run's start #running is already null, and starting another run
    // there would run the task twice at once.
    if (this.#next) return this.#next;
    if (!this.#running) {
      const run = this.#gated();
      // Held at the gate: not started, so later callers join it.
      if (run !== this.#running) this.#next = run;
      return run;
    }
    const next = this.#running.then(
      () => this.#gated(),
      () => this.#gated(),
    );
    this.#next = next;
    return next;
  }

  /** Starts a run once the gate (if any) lets it. */
  #gated(): Promise<void> {
    const wait = this.#gate?.() ?? null;
    return wait ? wait.then(() => this.#start()) : this.#start();
  }

  /** Resolves when no run is under way or queued (errors ignored). */
  async idle(): Promise<void> {
    while (this.#running || this.#next) {
      await (this.#next ?? this.#running)!.catch(() => undefined);
    }
  }

  #start(): Promise<void> {
    this.#next = null;
    const run = this.#task().finally(() => {
      if (this.#running === run) this.#running = null;
    });
    this.#running = run;
    return run;
  }
}
