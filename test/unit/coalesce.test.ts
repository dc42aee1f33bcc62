// The group-commit Coalescer (src/cache/coalesce.ts): every caller is served by a run of the task
// that started after its call, callers arriving during a run share one next run, runs never
// overlap, and a run's error reaches only its own callers.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { Coalescer } from '../../src/cache/coalesce.js';

interface Deferred {
  promise: Promise<void>;
  resolve: () => void;
  reject: (err: Error) => void;
}

function deferred(): Deferred {
  let resolve!: () => void;
  let reject!: (err: Error) => void;
  const promise = new Promise<void>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

/** A task whose runs the test finishes by hand; records when each run started and how many overlap. */
class ManualTask {
  readonly runs: Deferred[] = [];
  active = 0;
  maxActive = 0;
  readonly coalescer = new Coalescer(() => this.#run());

  async #run(): Promise<void> {
    const d = deferred();
    this.runs.push(d);
    this.active++;
    this.maxActive = Math.max(this.maxActive, this.active);
    try {
      await d.promise;
    } finally {
      this.active--;
    }
  }
}

/** Lets every queued microtask (and the ones they queue) run. */
async function settle(): Promise<void> {
  for (let i = 0; i < 20; i++) await Promise.resolve();
  await new Promise<void>((r) => setImmediate(r));
}

/** Observes a promise without letting an expected rejection go unhandled. */
function track(p: Promise<void>): { state: 'pending' | 'resolved' | 'rejected'; error?: unknown } {
  const t: { state: 'pending' | 'resolved' | 'rejected'; error?: unknown } = { state: 'pending' };
  p.then(
    () => (t.state = 'resolved'),
    (err: unknown) => {
      t.state = 'rejected';
      t.error = err;
    },
  );
  return t;
}

describe('Coalescer', () => {
  it('starts a run at once when idle and resolves its caller when it ends', async () => {
    const t = new ManualTask();
    const p = track(t.coalescer.run());
    expect(t.runs).toHaveLength(1);
    await settle();
    expect(p.state).toBe('pending');
    t.runs[0]!.resolve();
    await settle();
    expect(p.state).toBe('resolved');
  });

  it('makes every caller arriving during a run share one next run, started only after it', async () => {
    const t = new ManualTask();
    const first = track(t.coalescer.run());
    const during = [t.coalescer.run(), t.coalescer.run(), t.coalescer.run(), t.coalescer.run()];
    // All of them get the same promise: one run will serve them.
    for (const p of during) expect(p).toBe(during[0]);
    const waiting = during.map(track);
    await settle();
    expect(t.runs).toHaveLength(1);
    t.runs[0]!.resolve();
    await settle();
    expect(first.state).toBe('resolved');
    // The first run's end does not serve callers that came in while it ran.
    expect(waiting.map((w) => w.state)).toEqual(['pending', 'pending', 'pending', 'pending']);
    expect(t.runs).toHaveLength(2);
    t.runs[1]!.resolve();
    await settle();
    expect(waiting.map((w) => w.state)).toEqual(['resolved', 'resolved', 'resolved', 'resolved']);
    // Nothing else was queued: two runs in all.
    expect(t.runs).toHaveLength(2);
    expect(t.maxActive).toBe(1);
  });

  it('delivers a run\'s error to that run\'s callers only', async () => {
    const t = new ManualTask();
    const a = track(t.coalescer.run());
    const b = track(t.coalescer.run());
    const c = track(t.coalescer.run());
    t.runs[0]!.reject(new Error('first run failed'));
    await settle();
    expect(a.state).toBe('rejected');
    expect((a.error as Error).message).toBe('first run failed');
    // b and c joined the next run, which starts despite the failure and has its own outcome.
    expect([b.state, c.state]).toEqual(['pending', 'pending']);
    expect(t.runs).toHaveLength(2);
    const d = track(t.coalescer.run());
    t.runs[1]!.resolve();
    await settle();
    expect([b.state, c.state]).toEqual(['resolved', 'resolved']);
    expect(t.runs).toHaveLength(3);
    t.runs[2]!.reject(new Error('third run failed'));
    await settle();
    expect(d.state).toBe('rejected');
    expect((d.error as Error).message).toBe('third run failed');
    // The coalescer keeps working after failures.
    const e = track(t.coalescer.run());
    expect(t.runs).toHaveLength(4);
    t.runs[3]!.resolve();
    await settle();
    expect(e.state).toBe('resolved');
  });

  it('never runs two tasks at once, even when a caller re-enters as soon as its run ends', async () => {
    // `await coalescer.run(); await coalescer.run()` in one caller while another caller is queued
    // for the next run: the re-entering caller resumes between the end of the run and the start
    // of the queued one.
    const t = new ManualTask();
    const first = t.coalescer.run();
    let again: Promise<void> | undefined;
    void first.then(() => {
      again = t.coalescer.run();
    });
    const queued = track(t.coalescer.run());
    t.runs[0]!.resolve();
    await settle();
    expect(again).toBeDefined();
    const reentered = track(again!);
    expect(t.maxActive).toBe(1);
    for (let i = 1; i < t.runs.length; i++) t.runs[i]!.resolve();
    await settle();
    for (let i = 1; i < t.runs.length; i++) t.runs[i]!.resolve();
    await settle();
    expect(queued.state).toBe('resolved');
    expect(reentered.state).toBe('resolved');
    expect(t.maxActive).toBe(1);
  });

  it('idle() waits for the current and the queued run, and ignores their errors', async () => {
    const t = new ManualTask();
    await t.coalescer.idle();
    const a = track(t.coalescer.run());
    const b = track(t.coalescer.run());
    let idle = false;
    void t.coalescer.idle().then(() => (idle = true));
    t.runs[0]!.reject(new Error('boom'));
    await settle();
    expect(a.state).toBe('rejected');
    expect(idle).toBe(false);
    t.runs[1]!.reject(new Error('boom again'));
    await settle();
    expect(b.state).toBe('rejected');
    expect(idle).toBe(true);
    await t.coalescer.idle();
  });

  it('serves every caller with a run that started after its call, under any schedule', async () => {
    // Commands: a caller arrives, or the oldest unfinished run ends (ok or failing). A logical
    // clock orders calls, run starts and run ends; a caller that resolves or rejects must have
    // been served by a run that started after its call and has ended.
    type Cmd = { kind: 'call' } | { kind: 'end'; fail: boolean } | { kind: 'reenter' };
    const cmdArb: fc.Arbitrary<Cmd> = fc.oneof(
      { weight: 4, arbitrary: fc.constant({ kind: 'call' as const }) },
      { weight: 3, arbitrary: fc.boolean().map((fail) => ({ kind: 'end' as const, fail })) },
      { weight: 1, arbitrary: fc.constant({ kind: 'reenter' as const }) },
    );
    await fc.assert(
      fc.asyncProperty(fc.array(cmdArb, { maxLength: 40 }), async (cmds) => {
        let clock = 0;
        const starts: number[] = [];
        const ends: number[] = [];
        const outcome: ('ok' | 'fail')[] = [];
        const pending: { d: Deferred; index: number }[] = [];
        let active = 0;
        let maxActive = 0;
        const coalescer = new Coalescer(async () => {
          const index = starts.length;
          starts.push(++clock);
          const d = deferred();
          pending.push({ d, index });
          active++;
          maxActive = Math.max(maxActive, active);
          try {
            await d.promise;
          } finally {
            active--;
          }
        });
        const problems: string[] = [];
        const check = (callAt: number, ok: boolean) => {
          const at = ++clock;
          // The runs that ended before now and started after the call, with the matching outcome.
          const served = starts.some((s, i) => s > callAt && ends[i] !== undefined && ends[i]! < at && outcome[i] === (ok ? 'ok' : 'fail'));
          if (!served) problems.push(`caller of t=${callAt} ${ok ? 'resolved' : 'rejected'} at t=${at} without a run started after it`);
        };
        const call = () => {
          const callAt = ++clock;
          coalescer.run().then(
            () => check(callAt, true),
            () => check(callAt, false),
          );
        };
        for (const cmd of cmds) {
          if (cmd.kind === 'call') call();
          else if (cmd.kind === 'reenter') {
            // A caller that calls again the moment its own run ends.
            const callAt = ++clock;
            coalescer.run().then(
              () => {
                check(callAt, true);
                call();
              },
              () => {
                check(callAt, false);
                call();
              },
            );
          } else {
            const run = pending.shift();
            if (run) {
              ends[run.index] = ++clock;
              outcome[run.index] = cmd.fail ? 'fail' : 'ok';
              if (cmd.fail) run.d.reject(new Error('run failed'));
              else run.d.resolve();
            }
          }
          await settle();
        }
        // Drain: end every run until nothing is queued.
        for (let guard = 0; pending.length > 0 && guard < 100; guard++) {
          const run = pending.shift()!;
          ends[run.index] = ++clock;
          outcome[run.index] = 'ok';
          run.d.resolve();
          await settle();
        }
        await coalescer.idle();
        expect(problems).toEqual([]);
        expect(maxActive).toBeLessThanOrEqual(1);
      }),
      {
        numRuns: 300,
        // Regression: a caller re-entering from its run's continuation started a second run
        // while the queued one started too (two tasks at once), found with seed 1854062412.
        examples: [[[{ kind: 'reenter' }, { kind: 'call' }]]],
      },
    );
  });
});
