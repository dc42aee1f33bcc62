// The command lines' own parsing, in process: refusals that happen before anything is opened
// (unknown options, swapped arguments) and --version. One line on stderr, exit 1, or the version.
import { afterEach, describe, expect, it, vi } from 'vitest';
import { main as ulobdev } from '../../src/cli/ulobdev.js';
import { main as ulohttp } from '../../src/cli/ulohttp.js';

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
});
