// test/support/vm.ts's checkBundleFresh: the VM files run dist/cli/ulobdev.bundle.js, so a bundle
// older than the compiled modules (a `tsc` without `make build`) must stop the run, not test old code.
import { mkdirSync, mkdtempSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { checkBundleFresh, StaleBundleError } from '../support/vm.js';

let root: string | undefined;
afterEach(() => {
  if (root) rmSync(root, { recursive: true, force: true });
  root = undefined;
});

/** A project directory with dist/cli/ulobdev.bundle.js and dist/src/mod.js of the given mtimes (s since the epoch). */
function project(bundleAt: number | undefined, moduleAt: number): string {
  root = mkdtempSync(join(tmpdir(), 'ulob-bundle-'));
  mkdirSync(join(root, 'dist/cli'), { recursive: true });
  mkdirSync(join(root, 'dist/src'), { recursive: true });
  writeFileSync(join(root, 'dist/src/mod.js'), '');
  utimesSync(join(root, 'dist/src/mod.js'), moduleAt, moduleAt);
  if (bundleAt !== undefined) {
    writeFileSync(join(root, 'dist/cli/ulobdev.bundle.js'), '');
    utimesSync(join(root, 'dist/cli/ulobdev.bundle.js'), bundleAt, bundleAt);
  }
  return root;
}

describe('checkBundleFresh', () => {
  it('passes a bundle made after every compiled module', () => {
    expect(() => checkBundleFresh(project(2_000_000, 1_000_000))).not.toThrow();
  });

  it('stops a bundle older than a compiled module in a subdirectory, saying to run make build', () => {
    const dir = project(1_000_000, 2_000_000);
    expect(() => checkBundleFresh(dir)).toThrow(StaleBundleError);
    expect(() => checkBundleFresh(dir)).toThrow(/older than the compiled modules under dist\/: run `make build`/);
  });

  it('stops when there is no bundle', () => {
    expect(() => checkBundleFresh(project(undefined, 1_000_000))).toThrow(/ulobdev\.bundle\.js is missing: run `make build`/);
  });
});
