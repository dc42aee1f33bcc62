// The command lines' own parsing, in process: refusals that happen before anything is opened
// (unknown options, swapped arguments) and --version. One line on stderr, exit 1, or the version.
import { readFileSync } from 'node:fs';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { main as ulobdev } from '../../src/cli/ulobdev.js';
import { main as ulohttp } from '../../src/cli/ulohttp.js';

const VERSION = (JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }).version;

async function run(main: (argv: string[]) => Promise<number>, args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  let stdout = '';
  let stderr = '';
  vi.spyOn(process.stdout, 'write').mockImplementation((chunk: string | Uint8Array) => ((stdout += String(chunk)), true));
  vi.spyOn(process.stderr, 'write').mockImplementation((chunk: string | Uint8Array) => ((stderr += String(chunk)), true));
  try {
    const code = await main(['node', 'cli', ...args]);
    return { code, stdout, stderr };
  } finally {
    vi.restoreAllMocks();
  }
}

afterEach(() => vi.restoreAllMocks());

describe('command-line parsing', () => {
  it('suggests the option meant for a misspelt one, on the same one line', async () => {
    const r = await run(ulobdev, ['--writback', '/dev/loop6', '/tmp/disk.img']);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe("ulobdev: unknown option '--writback' (Did you mean --writeback?)\n");
    const h = await run(ulohttp, ['--hydrat', '/dev/loop6', 'http://127.0.0.1/disk.img']);
    expect(h.code).toBe(1);
    expect(h.stderr).toBe("ulohttp: unknown option '--hydrat' (Did you mean --hydrate?)\n");
  });

  it('names the long option meant by one written with one dash (-writeback: newuser14), on the same one line', async () => {
    const r = await run(ulobdev, ['-writeback', '/dev/loop6', '/tmp/disk.img']);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe("ulobdev: unknown option '-writeback' (Did you mean --writeback?)\n");
    const f = await run(ulobdev, ['flush', '-wait', 'data']);
    expect(f.stderr).toBe("ulobdev: unknown option '-wait' (Did you mean --wait?)\n");
  });

  it('names the command meant for a misspelt one instead of taking it as an attach DEVICE', async () => {
    for (const [typo, meant] of [['statsu', 'status'], ['detatch', 'detach'], ['flsuh', 'flush'], ['hydrat', 'hydrate']]) {
      const r = await run(ulobdev, [typo!, ...(typo === 'statsu' ? [] : ['data'])]);
      expect(r.code, typo).toBe(1);
      expect(r.stdout).toBe('');
      expect(r.stderr).toBe(`ulobdev: unknown command '${typo}' (Did you mean ${meant}?)\n`);
    }
    // A word close to no command is left to the attach form, which names what is wrong.
    const far = await run(ulobdev, ['xyzzy']);
    expect(far.code).toBe(1);
    expect(far.stderr).toBe("ulobdev: missing required argument 'BACKEND' (usage: ulobdev [options] DEVICE BACKEND, e.g. 'ulobdev --writeback /dev/loop6 /dev/sdb'; 'ulobdev attach --help' says more)\n");
  });

  it('refuses an unknown --log-level in one line naming the levels, exit 1', async () => {
    for (const main of [ulobdev, ulohttp]) {
      const r = await run(main, ['--log-level', 'bogus', '/dev/loop6', '/tmp/disk.img']);
      expect(r.code).toBe(1);
      expect(r.stderr).toMatch(/^ul\w+: option '--log-level <LEVEL>' argument 'bogus' is invalid\. Allowed choices are fatal, error, warn, info, debug\.\n$/);
    }
  });

  it('--help, attach --help and hydrate --help name every DEVICE form README lists, and DEVICE|NAME', async () => {
    const attach = await run(ulobdev, ['attach', '--help']);
    expect(attach.code).toBe(0);
    // commander wraps the argument's text to the terminal: compare it as one line.
    attach.stdout = attach.stdout.replace(/\s+/g, ' ');
    expect(attach.stdout).toMatch(/\/dev\/loop: the first free one/);
    expect(attach.stdout).toMatch(/\/dev\/ublkbN \(\/dev\/ublkb: the next free one\)/);
    const hydrate = await run(ulobdev, ['hydrate', '--help']);
    expect(hydrate.stdout).toMatch(/hydrate \[options\] <DEVICE\|NAME>/);
    const man = readFileSync(new URL('../../src/cli/man-pages.ts', import.meta.url), 'utf8');
    expect(man).toMatch(/\/dev\/ublkbN/);
  });

  it('ulohttp attach --help names the same DEVICE forms as ulobdev attach --help, and ulohttp --help says where they are', async () => {
    const oneLine = (s: string) => s.replace(/\s+/g, ' ');
    const forms = (help: string) => oneLine(help).match(/DEVICE (\/dev\/loopN.*?nbd:\/\/HOST:PORT)/)?.[1];
    const ulob = await run(ulobdev, ['attach', '--help']);
    const http = await run(ulohttp, ['attach', '--help']);
    expect(http.code).toBe(0);
    expect(forms(ulob.stdout)).toMatch(/\/dev\/uloopN/);
    expect(forms(http.stdout)).toBe(forms(ulob.stdout));
    const top = await run(ulohttp, ['--help']);
    expect(top.code).toBe(0);
    expect(oneLine(top.stdout)).toMatch(/'ulohttp attach --help' lists every DEVICE form and every option of the attach form\./);
    expect(oneLine((await run(ulobdev, ['--help'])).stdout)).toMatch(/'ulobdev attach --help' lists every DEVICE form and every option of the attach form\./);
  });

  it('prints the version from package.json', async () => {
    for (const [main, name] of [[ulobdev, 'ulobdev'], [ulohttp, 'ulohttp']] as const) {
      for (const flag of ['--version', '-V']) {
        const r = await run(main, [flag]);
        expect(r, `${name} ${flag}`).toEqual({ code: 0, stdout: `${VERSION}\n`, stderr: '' });
      }
    }
  });

  it('repeats the whole command, options kept, when DEVICE and BACKEND look swapped', async () => {
    const r = await run(ulobdev, ['-c', '/tmp/f/d.cache', '--writeback', '--flush', '*/30 * * * *', '--daemon', '/tmp/disk.img', '/dev/loop4']);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe(
      "ulobdev: DEVICE and BACKEND look swapped: the device to create comes first, then the disk to cache: ulobdev -c /tmp/f/d.cache --writeback --flush '*/30 * * * *' --daemon /dev/loop4 /tmp/disk.img\n",
    );
  });
});
