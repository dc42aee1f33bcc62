import { defineConfig } from 'vitest/config';

// Two projects, which scripts/test.sh (`make test`) runs side by side:
//  - vm:   test/vm, every file boots qemu guests (single-threaded TCG: one core each); one vitest
//          process per file, from a longest-first queue that one worker (two once package.test's
//          lane is done) takes files from;
//  - host: everything else (unit, model, integration) in one vitest process: CPU in the models,
//          mostly waiting on fsync, loop devices and child processes in the integration files.
// `npx vitest run` alone still runs both, one file at a time on 2 cores; `--project vm` picks one.
// ULOB_HOST_EXCLUDE: comma-separated files the host project leaves out (scripts/test.sh runs them in
// a lane of their own; vitest's --exclude does not reach a project's own exclude list).
const hostExclude = (process.env.ULOB_HOST_EXCLUDE ?? '').split(',').filter(Boolean);
export default defineConfig({
  test: {
    testTimeout: 60_000,
    hookTimeout: 60_000,
    pool: 'forks',
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
