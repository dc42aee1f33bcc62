// The log of a --daemon daemon (RUN_DIR/NAME.log, in /run: RAM) is bounded by logrotate with the
// snippet `make install` puts in /etc/logrotate.d (contrib/logrotate/ulobdev): the real logrotate
// renames the file and sends SIGHUP, and the daemon reopens NAME.log (stdout and stderr both) and
// keeps serving. Before, SIGHUP killed the daemon (node's default) and the log grew for ever.
import { spawn } from 'node:child_process';
import { closeSync, openSync, readFileSync, readlinkSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { mustSh, prepareCliTests, ROOT, scratch, ulobdev } from '../support/cli.js';

let s: ReturnType<typeof scratch>;
const undo: Array<() => unknown> = [];

beforeAll(() => {
  prepareCliTests();
});

afterEach(async () => {
  for (const step of undo.splice(0).reverse()) await step();
  s?.cleanup();
});

/** Runs the shipped snippet, its /run/ulobdev/ put at the test's run directory, forced (-f). */
function logrotate(): string {
  const conf = join(s.dir, 'logrotate.conf');
  writeFileSync(conf, readFileSync(join(ROOT, 'contrib/logrotate/ulobdev'), 'utf8').replaceAll('/run/ulobdev/', `${s.runDir}/`));
  return mustSh('logrotate', ['-f', '-s', join(s.dir, 'logrotate.state'), conf]);
}

/** The `msg` of each JSON line of a log. */
function msgs(path: string): string[] {
  return readFileSync(path, 'utf8')
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => (JSON.parse(l) as { msg: string }).msg);
}

async function until(what: string, ok: () => boolean): Promise<void> {
  const deadline = Date.now() + 20_000;
  while (!ok()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

describe('--daemon log rotation', () => {
  it('logrotate renames NAME.log and the daemon reopens it on SIGHUP, still serving', async () => {
    s = scratch('ulob-logrotate-');
    const disk = join(s.dir, 'disk.img');
    mustSh('truncate', ['-s', '16M', disk]);
    const url = `nbd+unix:///?socket=${join(s.dir, 'nbd.sock')}`;
    const args = ['-c', join(s.dir, 'c.cache'), '--writeback', '--name', 'lr', '--daemon', '--run-dir', s.runDir];
    const started = await ulobdev([...args, url, disk]);
    expect(started.code, started.stderr).toBe(0);
    undo.push(() => ulobdev(['detach', 'lr', '--run-dir', s.runDir]));
    const log = join(s.runDir, 'lr.log');
    const pid = (JSON.parse(readFileSync(join(s.runDir, 'lr.json'), 'utf8')) as { pid: number }).pid;
    expect(msgs(log)).toContain('attached');

    logrotate();
    expect(msgs(`${log}.1`)).toContain('attached');
    // The daemon made the new file itself, owner only, and points stdout and stderr at it.
    await until('the reopen', () => readlinkSync(`/proc/${pid}/fd/2`) === log);
    expect(readlinkSync(`/proc/${pid}/fd/1`)).toBe(log);
    expect(statSync(log).mode & 0o777).toBe(0o600);
    expect(msgs(log)).toEqual([`reopened the log ${log}`]);

    // Still serving, and what it logs next goes to the new file.
    const flushed = await ulobdev(['flush', '--wait', 'lr', '--run-dir', s.runDir]);
    expect(flushed.code, flushed.stderr).toBe(0);
    expect(msgs(log).some((m) => m.startsWith('flushed dirty blocks'))).toBe(true);
    expect(msgs(`${log}.1`).some((m) => m.startsWith('flushed dirty blocks'))).toBe(false);

    // A second rotation: the first one compressed, the second renamed (delaycompress).
    logrotate();
    await until('the second reopen', () => readlinkSync(`/proc/${pid}/fd/2`) === log);
    expect(statSync(`${log}.2.gz`).size).toBeGreaterThan(0);
  });

  it('signals no process whose stderr is the log but that does not catch SIGHUP (a daemon of an older ulobdev, review14)', async () => {
    s = scratch('ulob-logrotate-');
    mustSh('mkdir', ['-p', s.runDir]);
    const log = join(s.runDir, 'old.log');
    writeFileSync(log, '{"msg":"attached"}\n');
    const fd = openSync(log, 'a');
    const old = spawn('sleep', ['60'], { stdio: ['ignore', fd, fd] });
    closeSync(fd);
    undo.push(() => old.kill('SIGKILL'));
    const exited = new Promise<NodeJS.Signals | null>((r) => old.on('exit', (_code, signal) => r(signal)));
    writeFileSync(join(s.runDir, 'old.json'), JSON.stringify({ name: 'old', device: '/dev/loop9', frontend: 'loop', pid: old.pid }));
    await until('the sleep to run', () => readlinkSync(`/proc/${old.pid}/fd/2`) === log);
    logrotate();
    expect(readFileSync(`${log}.1`, 'utf8')).toContain('attached');
    old.kill('SIGTERM');
    expect(await exited).toBe('SIGTERM'); // not SIGHUP first
  });

  it('signals no process whose stderr is not the rotated log (a stale record, a pid reused)', async () => {
    s = scratch('ulob-logrotate-');
    mustSh('mkdir', ['-p', s.runDir]);
    const other = spawn('sleep', ['60'], { stdio: 'ignore' });
    undo.push(() => other.kill('SIGKILL'));
    const exited = new Promise<NodeJS.Signals | null>((r) => other.on('exit', (_code, signal) => r(signal)));
    writeFileSync(join(s.runDir, 'gone.json'), JSON.stringify({ name: 'gone', device: '/dev/loop9', frontend: 'loop', pid: other.pid }));
    writeFileSync(join(s.runDir, 'gone.log'), '{"msg":"detached"}\n');
    logrotate();
    expect(readFileSync(join(s.runDir, 'gone.log.1'), 'utf8')).toContain('detached');
    other.kill('SIGTERM');
    expect(await exited).toBe('SIGTERM'); // not SIGHUP first
  });
});
