// Group commit: many callers asking "make everything before now durable" share one execution.
// A caller arriving while a run is under way cannot be served by it (its data may have been
// written after that run started), so it joins the next run, which all such callers share.

export class Coalescer {
  readonly #task: () => Promise<void>;
  #running: Promise<void> | null = null;
  #next: Promise<void> | null = null;

  constructor(task: () => Promise<void>) {
    this.#task = task;
  }

  /** Resolves after a run of the task that started after this call has finished. */
  run(): Promise<void> {
    // A queued run has not started yet, so it can serve this caller too. Checked first: between a
    // run's end and the queued run's start #running is already null, and starting another run
    // there would run the task twice at once.
    if (this.#next) return this.#next;
    if (!this.#running) return this.#start();
    if (!this.#next) {
      const next = this.#running.then(
        () => this.#start(),
        () => this.#start(),
      );
      this.#next = next;
    }
    return this.#next;
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
