// The error registry (src/errors.ts) and the exit codes by kind (src/cli/exit-codes.ts): every
// error class has one stable code of one kind, errors cross the control socket as their own class,
// no code is typed outside the registry, and the README documents every exit code.
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { CommanderError } from 'commander';
import { describe, expect, it } from 'vitest';
import * as errors from '../../src/errors.js';
import { EXIT_CODES, exitCodeFor, undone } from '../../src/cli/exit-codes.js';
import { ControlServer, controlRequest } from '../../src/daemon/control.js';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
const { ERROR_CODES, UlobError, errorFromCode } = errors;

/** Every error class errors.ts exports, made with a message only (the registry's way). */
const classes = Object.values(errors).filter(
  (v): v is new (message: string) => errors.UlobError =>
    typeof v === 'function' && v.prototype instanceof UlobError && v !== errors.UnknownDaemonError,
);

function sourceFiles(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? sourceFiles(join(dir, e.name)) : e.name.endsWith('.ts') ? [join(dir, e.name)] : [],
  );
}

describe('the error registry', () => {
  it('gives every class one code of its own, of a known kind, rebuilt as the same class', () => {
    expect(classes.length).toBeGreaterThan(25);
    const seen = new Map<string, string>();
    for (const Class of classes) {
      const e = new Class('something went wrong');
      expect(e.name).toBe(Class.name);
      expect(e.code, Class.name).toMatch(/^ULOB_E_[A-Z_]+$/);
      expect(seen.get(e.code), `${Class.name} and ${seen.get(e.code)} share ${e.code}`).toBeUndefined();
      seen.set(e.code, Class.name);
      expect(ERROR_CODES[e.code], `${e.code} is not in ERROR_CODES`).toBeDefined();
      expect(['refused', 'io', 'daemon', 'internal']).toContain(e.kind);
      const back = errorFromCode(e.code, e.message);
      expect(back).toBeInstanceOf(Class);
      expect(back).toMatchObject({ code: e.code, message: e.message });
    }
    expect([...seen.keys()].sort()).toEqual(Object.keys(ERROR_CODES).sort());
  });

  it('keeps an unknown code as it came, of kind io for an errno name and internal otherwise', () => {
    expect(errorFromCode('ULOB_E_FROM_THE_FUTURE', 'x')).toMatchObject({ code: 'ULOB_E_FROM_THE_FUTURE', message: 'x', kind: 'internal' });
    expect(errorFromCode('EIO', 'y')).toMatchObject({ code: 'EIO', kind: 'io' });
  });

  it('is the only place with codes: no literal ULOB_E_ code, UlobError construction or bare Error elsewhere in src/', () => {
    const offenders: string[] = [];
    for (const file of sourceFiles(join(ROOT, 'src'))) {
      if (file.endsWith('/src/errors.ts')) continue;
      readFileSync(file, 'utf8')
        .split('\n')
        .forEach((line, i) => {
          if (/'ULOB_E_|"ULOB_E_|`ULOB_E_|new UlobError\(|throw new Error\(|defineProperty\([^)]*'code'/.test(line)) offenders.push(`${file.slice(ROOT.length + 1)}:${i + 1}: ${line.trim()}`);
        });
    }
    expect(offenders).toEqual([]);
  });

  it('sends an error over the control socket and rebuilds it as its own class', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'ulob-errors-'));
    const path = join(dir, 'd.sock');
    const server = await ControlServer.listen(path, async (req) => {
      if (req.cmd === 'detach') throw new errors.DeviceBusyError('/dev/loop7 is mounted on /mnt; unmount it first');
      throw Object.assign(new Error('EIO: i/o error, pwrite'), { code: 'EIO' });
    });
    try {
      const busy = await controlRequest(path, { cmd: 'detach' }).catch((e: unknown) => e);
      expect(busy).toBeInstanceOf(errors.DeviceBusyError);
      expect(exitCodeFor(busy)).toBe(1);
      const io = await controlRequest(path, { cmd: 'flush' }).catch((e: unknown) => e);
      expect(io).toMatchObject({ code: 'EIO', message: 'EIO: i/o error, pwrite' });
      expect(exitCodeFor(io)).toBe(74);
    } finally {
      await server.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('exit codes by kind', () => {
  it('are distinct, and bad input is 1 (invariant 6)', () => {
    const codes = EXIT_CODES.map((e) => e.code);
    expect(new Set(codes).size).toBe(codes.length);
    expect(EXIT_CODES.find((e) => e.name === 'refused')?.code).toBe(1);
    expect(EXIT_CODES.find((e) => e.name === 'ok')?.code).toBe(0);
  });

  it('map every kind of failure', () => {
    expect(exitCodeFor(new errors.InvalidArgumentError('bad'))).toBe(1);
    expect(exitCodeFor(new errors.ForeignCacheError('not yours'))).toBe(1);
    expect(exitCodeFor(new errors.NotAttachedError('nobody'))).toBe(1);
    expect(exitCodeFor(new CommanderError(1, 'commander.missingArgument', 'missing'))).toBe(1);
    expect(exitCodeFor(new CommanderError(0, 'commander.helpDisplayed', '(outputHelp)'))).toBe(0);
    expect(exitCodeFor(new errors.IOFailedError('cannot write'))).toBe(74);
    expect(exitCodeFor(new errors.HttpError('gone'))).toBe(74);
    expect(exitCodeFor(Object.assign(new Error('ENOSPC'), { code: 'ENOSPC', syscall: 'write' }))).toBe(74);
    expect(exitCodeFor(new errors.DaemonError('it exited'))).toBe(69);
    expect(exitCodeFor(new errors.DaemonTimeoutError('no answer'))).toBe(69);
    expect(exitCodeFor(new TypeError('x is undefined'))).toBe(70);
    expect(exitCodeFor(new errors.InternalError('impossible'))).toBe(70);
  });

  it('make a rolled-back command a refusal, except for a bug', () => {
    expect(exitCodeFor(undone(new errors.IOFailedError('cannot open backing device /x: ENOENT')))).toBe(1);
    expect(exitCodeFor(undone(new errors.DaemonError('exited')))).toBe(1);
    expect(exitCodeFor(undone(new TypeError('bug')))).toBe(70);
  });

  it('are documented in the README, each row as the table in code has it', () => {
    const readme = readFileSync(join(ROOT, 'README.md'), 'utf8');
    const use = readme.slice(readme.indexOf('## Use'), readme.indexOf('\n## ', readme.indexOf('## Use') + 1));
    for (const e of EXIT_CODES) expect(use, `exit code ${e.code} (${e.name})`).toContain(`| ${e.code} | ${e.name} | ${e.meaning} |`);
  });
});
