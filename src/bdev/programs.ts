// Running the helper programs a frontend needs (losetup, nbdfuse, fusermount3): always with an
// argument vector, never through a shell; failures become one-line errors carrying their stderr.
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { CommandFailedError, MissingProgramError } from '../errors.js';

export function run(program: string, args: readonly string[], options: { timeoutMs?: number } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(program, args, { timeout: options.timeoutMs ?? 30_000, encoding: 'utf8' }, (err, stdout, stderr) => {
      if (!err) return resolve(stdout);
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return reject(new MissingProgramError(`${program} is not installed (apt-get install ${packageOf(program)})`));
      const command = [program, ...args].join(' ');
      const last = stderr.trim().split('\n').pop() ?? '';
      reject(new CommandFailedError(`${command} failed: ${last || err.message}`, { command, stderr }));
    });
  });
}

/** Starts a long-running helper; its stderr is kept (bounded) for error messages. */
export function start(program: string, args: readonly string[]): { child: ChildProcess; stderr: () => string; exited: Promise<number | null> } {
  const child = spawn(program, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr?.setEncoding('utf8');
  child.stderr?.on('data', (chunk: string) => {
    err = (err + chunk).slice(-4096);
  });
  const exited = new Promise<number | null>((resolve) => {
    child.once('error', () => resolve(-1));
    child.once('exit', (code) => resolve(code));
  });
  return { child, stderr: () => err, exited };
}

function packageOf(program: string): string {
  switch (program) {
    case 'nbdfuse':
      return 'libnbd-bin';
    case 'fusermount3':
      return 'fuse3';
    case 'nbd-client':
      return 'nbd-client';
    default:
      return 'util-linux';
  }
}
