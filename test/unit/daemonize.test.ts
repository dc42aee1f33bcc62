// --daemon's parent (src/cli/background.ts daemonize): the child it starts answers READY or ERROR on
// fd 3; a child that dies without a word must still leave its cause on the user's terminal, not
// only in its log. Real child processes, small scripts standing in for the daemon.
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { daemonize, lastLogMessage } from '../../src/cli/background.js';

let dir: string;
afterEach(() => {
  vi.restoreAllMocks();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

function script(body: string): string[] {
  dir = mkdtempSync(join(tmpdir(), 'ulob-daemonize-'));
  const file = join(dir, 'child.mjs');
  writeFileSync(file, `import { writeSync } from 'node:fs';\n${body}\n`);
  return [process.execPath, file];
}

const device = 'nbd+unix:///?socket=/nowhere.sock';

describe('daemonize', () => {
  it('prints the device once the child says READY', async () => {
    const command = script(`writeSync(3, 'READY ${device}\\n'); setTimeout(() => {}, 100);`);
    const out = vi.spyOn(process.stdout, 'write').mockImplementation(() => true);
    await daemonize(device, { name: 'n', runDir: join(dir, 'run'), args: [], command });
    expect(out).toHaveBeenCalledWith(`${device}\n`);
  });

  it("throws the child's ERROR as its own error, and leaves no log of the refusal", async () => {
    const command = script(`process.stderr.write('some log\\n'); writeSync(3, 'ERROR ULOB_E_DEVICE_BUSY /dev/loop3 is in use\\n'); process.exit(1);`);
    const run = join(dir, 'run');
    await expect(daemonize(device, { name: 'n', runDir: run, args: [], command })).rejects.toMatchObject({ code: 'ULOB_E_DEVICE_BUSY', message: '/dev/loop3 is in use' });
    expect(existsSync(join(run, 'n.log'))).toBe(false);
    expect(existsSync(run)).toBe(false);
  });

  it('a child that exits without a word: its last error line, on stderr, not "see the log"', async () => {
    const command = script(`process.stderr.write('ulobdev: missing required argument \\'BACKEND\\'\\n'); process.exit(1);`);
    const run = join(dir, 'run');
    const err = await daemonize(device, { name: 'n', runDir: run, args: [], command }).catch((e: Error) => e);
    expect((err as Error).message).toBe(`the daemon exited with status 1 before it was ready: missing required argument 'BACKEND' (log: ${join(run, 'n.log')})`);
    expect((err as { code?: string }).code).toBe('ULOB_E_DAEMON');
    // The log keeps the whole story.
    expect(readFileSync(join(run, 'n.log'), 'utf8')).toContain("missing required argument 'BACKEND'");
  });

  it('a child killed by a signal: its last logged error', async () => {
    const command = script(
      `process.stderr.write(JSON.stringify({ level: 30, msg: 'starting' }) + '\\n' + JSON.stringify({ level: 50, msg: 'nbdfuse failed', err: { message: 'fusermount3: not found' } }) + '\\n' + JSON.stringify({ level: 30, msg: 'cleanup' }) + '\\n'); process.kill(process.pid, 'SIGKILL');`,
    );
    const err = await daemonize(device, { name: 'n', runDir: join(dir, 'run'), args: [], command }).catch((e: Error) => e);
    expect((err as Error).message).toMatch(/^the daemon was killed by SIGKILL before it was ready: nbdfuse failed: fusermount3: not found \(log: /);
  });

  it('reads only what this start wrote to an existing log', () => {
    expect(lastLogMessage('ulobdev: old failure\n')).toBe('old failure');
    expect(lastLogMessage('{"level":30,"msg":"fine"}\n')).toBeUndefined();
    expect(lastLogMessage('Error: boom\n    at x (y.js:1:1)\n')).toBe('Error: boom');
  });
});
