// The package the install tests use: `make deb` once (several test files may ask at the same
// time: one builds, the others wait and reuse it), plus a copy with a higher version for upgrades.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, rmSync } from 'node:fs';
import { join, resolve } from 'node:path';

export const ROOT = resolve(import.meta.dirname, '../..');

/** Builds build/ulobdev_VERSION_ARCH.deb if anything changed; returns its path. */
export function buildDeb(): string {
  mkdirSync(join(ROOT, 'out'), { recursive: true });
  const out = execFileSync('flock', [join(ROOT, 'out', '.deb.lock'), 'make', '-s', '-C', ROOT, 'deb'], {
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'inherit'],
    timeout: 900_000,
  });
  const deb = join(ROOT, out.trim().split('\n').pop()!);
  if (!existsSync(deb)) throw new Error(`make deb printed ${out}, but ${deb} does not exist`);
  return deb;
}

/**
 * The same package as `version` (dpkg-deb -R, control edited, rebuilt): an upgrade to test. Rebuilt
 * with gzip: what is tested is the version, and dpkg reads any of its compressions (xz: 38 s at load
 * 9 on 2 cores, gzip: 4 s; `make deb` itself still builds with xz).
 */
export function repackAs(deb: string, version: string, dir: string): string {
  const tree = join(dir, `repack-${version}`);
  const out = join(dir, `ulobdev_${version}.deb`);
  rmSync(tree, { recursive: true, force: true });
  execFileSync('dpkg-deb', ['-R', deb, tree]);
  execFileSync('sed', ['-i', `s/^Version: .*/Version: ${version}/`, join(tree, 'DEBIAN', 'control')]);
  execFileSync('dpkg-deb', ['--root-owner-group', '-Zgzip', '--build', tree, out], { stdio: 'pipe' });
  rmSync(tree, { recursive: true, force: true });
  return out;
}
