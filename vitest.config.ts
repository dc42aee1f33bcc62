import { defineConfig } from 'vitest/config';

// Two projects, which scripts/test.sh (`make test`) runs as two vitest processes side by side:
//  - vm:   test/vm, every file boots qemu guests (single-threaded TCG: one core each);
//  - host: everything else (unit, model, integration): CPU in the models, mostly waiting on
//          fsync, loop devices and child processes in the integration files.
// `npx vitest run` alone still runs both, one file at a time on 2 cores; `--project vm` picks one.
export default defineConfig({
  test: {
    testTimeout: 60_000,
    hookTimeout: 60_000,
    pool: 'forks',
    projects: [
      { extends: true, test: { name: 'vm', include: ['test/vm/**/*.test.ts'] } },
      { extends: true, test: { name: 'host', include: ['test/**/*.test.ts'], exclude: ['test/vm/**', '**/node_modules/**'] } },
    ],
  },
});
