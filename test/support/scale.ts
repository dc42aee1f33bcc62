// How many times the repeated tests repeat: the fast-check runs of the model tests (test/model/*),
// the suite's longest host tests. Each call site names its full count; ULOB_TEST_SCALE says which
// share of it a run does. (The fuzz and property tests elsewhere take seconds: they run in full.)
//   ULOB_TEST_SCALE unset  -> DEFAULT_SCALE, what `make test` runs (it keeps the suite under its
//                             30-minute budget on 2 cores);
//   ULOB_TEST_SCALE=1      -> the full counts (`make test-long`);
//   ULOB_TEST_SCALE=0.05   -> a quick look while editing; 4 -> a soak.
// Never fewer than one run. The named regression cases beside each property run whatever the scale.

/**
 * The share of the full counts `make test` runs: 0.4, i.e. 1,000 of the 2,500 sequences of each
 * engine model file (5,000 over the five, each of up to 24 steps with crashes at every
 * persistence point), and 400 of the uloop model's 1,000.
 */
export const DEFAULT_SCALE = 0.4;

/** The ULOB_TEST_SCALE in force (a positive number; throws on anything else, naming the variable). */
export function testScale(): number {
  const raw = process.env.ULOB_TEST_SCALE;
  if (raw === undefined || raw === '') return DEFAULT_SCALE;
  const n = Number(raw);
  if (!Number.isFinite(n) || n <= 0) throw new Error(`ULOB_TEST_SCALE=${raw}: give a positive number (1 = the full counts of make test-long, default ${DEFAULT_SCALE})`);
  return n;
}

/** `full` repetitions scaled by ULOB_TEST_SCALE, rounded up, at least 1. */
export function scaledRuns(full: number): number {
  return Math.max(1, Math.ceil(full * testScale()));
}
