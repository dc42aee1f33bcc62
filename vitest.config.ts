import { readFileSync } from 'node:fs';
import { relative } from 'node:path';
import { defineConfig } from 'vitest/config';
import { BaseSequencer, type TestSpecification } from 'vitest/node';

// Two projects, which scripts/test.sh (`make test`) runs side by side:
//  - vm:   test/vm, every file boots qemu guests (single-threaded TCG: one core each); one vitest
//          process per file, from a longest-first queue that one worker (two once package.test's
//          lane is done) takes files from;
//  - host: everything else (unit, model, integration) in one vitest process: CPU in the models,
//          mostly waiting on fsync, loop devices and child processes in the integration files.
//          make test runs two host files at a time (scripts/test.sh, --maxWorkers); every file
//          keeps to its own scratch directory, run directory, loop devices and ports, as it must
//          on a machine where other runs of the suite go on at the same time.
// `npx vitest run` alone still runs both, one file at a time on 2 cores; `--project vm` picks one.
// ULOB_HOST_EXCLUDE: comma-separated files the host project leaves out (scripts/test.sh runs them in
// a lane of their own; vitest's --exclude does not reach a project's own exclude list).
const hostExclude = (process.env.ULOB_HOST_EXCLUDE ?? '').split(',').filter(Boolean);

/**
 * Seconds each test file took in a `make test` ("SECONDS PATH" lines of scripts/test-times.txt,
 * host and VM files; other lines ignored). Read when the run starts.
 */
function measuredSeconds(): Map<string, number> {
  const times = new Map<string, number>();
  let text = '';
  try {
    text = readFileSync(new URL('./scripts/test-times.txt', import.meta.url), 'utf8');
  } catch {
    return times;
  }
  for (const line of text.split('\n')) {
    const m = /^(\d+) (\S+)/.exec(line);
    if (m) times.set(m[2]!, Number(m[1]));
  }
  return times;
}

/**
 * Longest file first, by scripts/test-times.txt; a file not listed there first of all (its time is
 * unknown: starting it early cannot leave it as the last long file). With two host files at a time
 * the long ones then overlap each other instead of one running alone at the end: on a clean clone
 * vitest has no results cache and would order by file size, which put the model tests (small files,
 * CPU-bound) last, when both VM workers run and the host lane at nice 10 gets little CPU.
 */
class LongestFirst extends BaseSequencer {
  override async sort(files: TestSpecification[]): Promise<TestSpecification[]> {
    const times = measuredSeconds();
    const root = this.ctx.config.root;
    const seconds = (f: TestSpecification) => times.get(relative(root, f.moduleId)) ?? Infinity;
    return [...files].sort((a, b) => seconds(b) - seconds(a) || (a.moduleId < b.moduleId ? -1 : 1));
  }
}

export default defineConfig({
  test: {
    testTimeout: 60_000,
    hookTimeout: 60_000,
    pool: 'forks',
    sequence: { sequencer: LongestFirst },
    projects: [
      { extends: true, test: { name: 'vm', include: ['test/vm/**/*.test.ts'] } },
      // The host lane shares the machine with a guest now: a default time limit of 180 s, not 60 s
      // (limits are for hangs; no test asserts on speed).
      {
        extends: true,
        test: { name: 'host', include: ['test/**/*.test.ts'], exclude: ['test/vm/**', '**/node_modules/**', ...hostExclude], testTimeout: 180_000, hookTimeout: 180_000 },
      },
    ],
  },
});
