// `make install` and `make deb` as a user meets them. make install into a DESTDIR (PREFIX=/usr/local):
// the layout the issue asks for, and the installed ulobdev runs from it alone (the source tree out
// of reach). The .deb installed, upgraded, removed, reinstalled and purged with dpkg in a Debian 13
// root and in a Debian 12 root (scripts/vm/package-test.sh, throwaway overlays over cached
// debootstrapped roots), with test/support/package-check.sh inside after each step: the commands,
// the man page, the unit, the udev rule, the DKMS source, and a daemon that caches, flushes and
// detaches with the installed files. The two dpkg runs (each a root of its own, under its own lock)
// start together in beforeAll and go on beside each other and beside make install: most of their
// time is debootstrap and dpkg waiting on the disk, and the file's wall time was their sum.
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildDeb, repackAs, ROOT } from '../support/deb.js';

const VERSION = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')).version as string;
let dir: string;
let deb: string;
/** The same package with a higher version: the upgrade both dpkg runs install (made once). */
let next: string;
/** package-test.sh of each suite, started in beforeAll; each test awaits its own. */
const runs: Partial<Record<'trixie' | 'bookworm', Promise<PackageRun>>> = {};

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'ulob-pkg-'));
  deb = buildDeb();
  next = repackAs(deb, `${VERSION}+upgrade1`, dir);
  for (const suite of ['trixie', 'bookworm'] as const) runs[suite] = packageTest(suite);
}, 900_000);

afterAll(async () => {
  // The runs read the packages in dir: let them end first (a failed test does not wait for them).
  await Promise.allSettled(Object.values(runs));
  if (dir) rmSync(dir, { recursive: true, force: true });
}, 1_500_000);

describe('make install', () => {
  it('puts a self-contained build under PREFIX/lib/ulobdev, the commands in sbin, units, udev, logrotate, docs, man pages and the DKMS source', () => {
    const dest = join(dir, 'dest');
    // DKMSDIR under the DESTDIR too (it is /usr/src whatever the prefix).
    execFileSync('make', ['-s', '-C', ROOT, 'install', `DESTDIR=${dest}`, 'PREFIX=/usr/local'], { stdio: 'pipe', timeout: 600_000 });
    const p = (rel: string) => join(dest, rel);
    for (const f of [
      'usr/local/sbin/ulobdev',
      'usr/local/sbin/ulohttp',
      'usr/local/lib/ulobdev/dist/cli/ulobdev.js',
      'usr/local/lib/ulobdev/build/Release/ulob_native.node',
      'usr/local/lib/ulobdev/node_modules/better-sqlite3/build/Release/better_sqlite3.node',
      'usr/local/lib/ulobdev/node_modules/commander/package.json',
      'usr/local/lib/ulobdev/ulobdev-name',
      'usr/local/lib/systemd/system/ulobdev@.service',
      'etc/udev/rules.d/60-ulobdev.rules',
      'etc/logrotate.d/ulobdev',
      'usr/local/share/man/man8/ulobdev.8.gz',
      'usr/local/share/man/man8/ulohttp.8.gz',
      'usr/local/share/doc/ulobdev/laptop.md',
      'usr/local/share/doc/ulobdev/example.conf',
      `usr/src/uloop-${VERSION}/dkms.conf`,
      `usr/src/uloop-${VERSION}/uloop.c`,
    ]) {
      expect(existsSync(p(f)), f).toBe(true);
    }
    expect(statSync(p('usr/local/sbin/ulobdev')).mode & 0o111).toBeTruthy();
    // Production dependencies only; nothing of the build's.
    for (const dev of ['vitest', 'typescript', 'node-gyp', 'fast-check']) expect(existsSync(p(`usr/local/lib/ulobdev/node_modules/${dev}`)), dev).toBe(false);
    expect(readFileSync(p('usr/local/lib/systemd/system/ulobdev@.service'), 'utf8')).toMatch(/^ExecStart=\/usr\/local\/sbin\/ulobdev /m);
    // Its Documentation= names where the docs went (newuser13: it kept /usr/share/doc under /usr/local).
    expect(readFileSync(p('usr/local/lib/systemd/system/ulobdev@.service'), 'utf8')).toMatch(/^Documentation=man:ulobdev\(8\) file:\/usr\/local\/share\/doc\/ulobdev\/laptop\.md$/m);
    expect(readFileSync(p('etc/udev/rules.d/60-ulobdev.rules'), 'utf8')).toContain('/usr/local/lib/ulobdev/ulobdev-name');
    expect(readFileSync(p(`usr/src/uloop-${VERSION}/dkms.conf`), 'utf8')).toMatch(new RegExp(`^PACKAGE_VERSION="${VERSION.replace(/\./g, '\\.')}"`, 'm'));

    // The installed program runs from the installed tree alone: its node_modules, its addon.
    const installed = p('usr/local/lib/ulobdev/dist/cli/ulobdev.js');
    const r = spawnSync(process.execPath, [installed, '--help'], { encoding: 'utf8', cwd: '/' });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^Usage: ulobdev/m);
    // /usr/local/sbin/ulobdev runs the bundle (one file: a restart's start time), which must find
    // better-sqlite3 and the addon in the installed tree too.
    expect(readFileSync(p('usr/local/sbin/ulobdev'), 'utf8')).toContain('/usr/local/lib/ulobdev/dist/cli/ulobdev.bundle.js');
    const bundled = spawnSync(process.execPath, [p('usr/local/lib/ulobdev/dist/cli/ulobdev.bundle.js'), '--help'], { encoding: 'utf8', cwd: '/' });
    expect(bundled.status, bundled.stderr).toBe(0);
    expect(bundled.stdout).toMatch(/^Usage: ulobdev/m);
    const addon = spawnSync(process.execPath, ['-e', `require(${JSON.stringify(p('usr/local/lib/ulobdev/build/Release/ulob_native.node'))})`], { encoding: 'utf8', cwd: '/' });
    expect(addon.status, addon.stderr).toBe(0);
  }, 600_000);
});

/** One package-test.sh run: its exit status (null: killed), stdout and stderr. */
interface PackageRun {
  status: number | null;
  stdout: string;
  stderr: string;
}

/** Starts package-test.sh for a suite (20 min at most); resolves when it exits, never rejects. */
function packageTest(suite: 'trixie' | 'bookworm'): Promise<PackageRun> {
  return new Promise((resolve) => {
    const child = spawn('bash', [join(ROOT, 'scripts/vm/package-test.sh'), suite, deb, next], { stdio: ['ignore', 'pipe', 'pipe'], timeout: 1_200_000 });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => (stdout += s));
    child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
    child.on('error', (err) => (stderr += `\n${String(err)}`));
    child.on('close', (status) => resolve({ status, stdout, stderr }));
  });
}

/** A run's step outputs as { step: { KEY: value }, rc: { step: code } }. */
function parseRun(r: PackageRun): { out: string; keys: Record<string, Record<string, string>>; rc: Record<string, number> } {
  const out = `${r.stdout}\n${r.stderr}`;
  // Where the time went (package-test.sh's phase lines), in the run's log.
  console.log(r.stderr.split('\n').filter((l) => l.startsWith('package-test: TIME')).join('\n'));
  expect(r.status, out).toBe(0);
  const keys: Record<string, Record<string, string>> = {};
  const rc: Record<string, number> = {};
  for (const line of r.stdout.split('\n')) {
    const step = /^STEP (\S+) rc=(\d+)$/.exec(line);
    if (step) rc[step[1]!] = Number(step[2]);
    const kv = /^([a-z-]+)\| ([A-Z_]+)=(.*)$/.exec(line);
    if (kv) (keys[kv[1]!] ??= {})[kv[2]!] = kv[3]!;
  }
  return { out, keys, rc };
}

describe.each(['trixie', 'bookworm'] as const)('the .deb with dpkg on %s', (suite) => {
  it('installs, upgrades, removes, reinstalls and purges cleanly, and works after each install', async () => {
    const { out, keys, rc } = parseRun(await runs[suite]!);
    for (const step of ['install', 'after-install', 'upgrade', 'after-upgrade', 'remove', 'after-remove', 'reinstall', 'purge', 'after-purge']) {
      expect(rc[step], `${step}\n${out}`).toBe(0);
    }
    for (const step of ['after-install', 'after-upgrade']) {
      const k = keys[step]!;
      expect(k.DPKG_STATE, out).toBe('ii');
      expect(k.HELP, out).toMatch(/^ok Usage: ulobdev/);
      expect(k.MAN, out).toBe('ok');
      expect(k.DKMS_SOURCE, out).toBe('ok');
      expect(k.UNIT, out).toBe('ok');
      expect(k.UDEV, out).toBe('ok');
      expect(k.LOGROTATE, out).toBe('ok');
      expect(k.LIB, out).toBe('ok');
      expect(k.DAEMON, out).toMatch(/^ok /);
      expect(k.NODE, out).toMatch(/^v(2[1-9]|20\.(19|[2-9]\d))\./);
    }
    expect(keys['after-install']!.VERSION).toBe(VERSION);
    expect(keys['after-upgrade']!.VERSION).toBe(`${VERSION}+upgrade1`);
    // Removed: configuration kept (rc); purged: nothing of ours left on disk.
    expect(keys['after-remove']!.DPKG_STATE, out).toBe('rc');
    expect(keys['after-purge']!.DPKG_STATE ?? '', out).toBe('');
    expect(keys['after-purge']!.FILES!.trim(), out).toBe('');
  }, 1_500_000);
});
