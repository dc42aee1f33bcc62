// The daemon's log under systemd: when stderr is the journal ($JOURNAL_STREAM names it), each event
// is one plain line led by its syslog priority (journald takes the <N> prefix as the priority),
// not pino's JSON; anywhere else (a pipe, a --daemon log file), JSON as before.
import { spawnSync } from 'node:child_process';
import { closeSync, fstatSync, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { assertBuilt, ROOT } from '../support/cli.js';

let dir: string;
beforeAll(() => {
  assertBuilt();
  dir = mkdtempSync(join(tmpdir(), 'ulob-journal-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Runs the built logger with stderr on a file; `stream` picks $JOURNAL_STREAM: the file's own id, another, or none. */
function logTo(name: string, stream: 'same' | 'other' | 'none'): string[] {
  const file = join(dir, name);
  const fd = openSync(file, 'w');
  const st = fstatSync(fd);
  const env = { ...process.env };
  delete env['ULOBDEV_NOTIFY_FD'];
  if (stream === 'same') env['JOURNAL_STREAM'] = `${st.dev}:${st.ino}`;
  else if (stream === 'other') env['JOURNAL_STREAM'] = `${st.dev}:${st.ino + 1}`;
  else delete env['JOURNAL_STREAM'];
  const script = `
    import { logTarget, makeLogger } from ${JSON.stringify(join(ROOT, 'dist/cli/background.js'))};
    const log = makeLogger('info', logTarget());
    log.info({ device: '/dev/loop6', dirtyBytes: 0 }, 'detached: wrote 3 MiB back; nothing stays dirty');
    log.warn('the disk did not spin down');
    log.error({ code: 'ULOB_E_X' }, 'flush failed: the disk is gone');
    log.debug('not shown at info');`;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'ignore', fd], env });
  closeSync(fd);
  expect(r.status).toBe(0);
  return readFileSync(file, 'utf8').split('\n').filter(Boolean);
}

describe('the daemon log on the journal', () => {
  it('stderr is the journal: one plain line per event with its syslog priority, no fields, no JSON', () => {
    expect(logTo('journal.log', 'same')).toEqual([
      '<6>detached: wrote 3 MiB back; nothing stays dirty',
      '<4>the disk did not spin down',
      '<3>flush failed: the disk is gone',
    ]);
  });
  it('a JOURNAL_STREAM that is not stderr (inherited by a pipe or a log file), or none: JSON lines', () => {
    for (const [name, stream] of [['other.log', 'other'], ['none.log', 'none']] as const) {
      const lines = logTo(name, stream);
      expect(lines).toHaveLength(3);
      const first = JSON.parse(lines[0]!) as { msg: string; level: number; dirtyBytes: number };
      expect(first).toMatchObject({ msg: 'detached: wrote 3 MiB back; nothing stays dirty', level: 30, dirtyBytes: 0 });
    }
  });
});
