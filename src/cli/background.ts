// What ulobdev and ulohttp share as daemons: the logger, `--daemon` (start in the background and
// return once the device is ready, as losetup does) and the READY or ERROR CODE line the child
// sends back.
import { spawn } from 'node:child_process';
import { closeSync, openSync, promises as fsp, writeSync } from 'node:fs';
import { join } from 'node:path';
import pino, { type Logger } from 'pino';
import { DaemonError, errorFromCode, errorToWire } from '../errors.js';
import { defaultName } from '../bdev/frontend.js';
import { RUN_DIR } from '../paths.js';
import { undone } from './exit-codes.js';

const NOTIFY_FD_ENV = 'ULOBDEV_NOTIFY_FD';

export function makeLogger(level: string): Logger {
  return pino({ level, base: { pid: process.pid } }, pino.destination({ fd: 2, sync: true }));
}

/** The first line of an error's message: what the CLI prints. */
export function oneLine(err: unknown): string {
  const message = err instanceof Error ? err.message : String(err);
  return message.split('\n')[0]!;
}

/**
 * Re-runs this command without --daemon as a detached child whose output goes to
 * RUN_DIR/NAME.log, and waits for its READY or ERROR line on an inherited pipe (fd 3).
 */
export async function daemonize(device: string, options: { name?: string; runDir?: string }): Promise<void> {
  const runDir = options.runDir ?? RUN_DIR;
  await fsp.mkdir(runDir, { recursive: true, mode: 0o700 });
  const logPath = join(runDir, `${options.name ?? defaultName(device)}.log`);
  const log = openSync(logPath, 'a', 0o600);
  const args = process.argv.slice(1).filter((a) => a !== '--daemon');
  const child = spawn(process.execPath, args, {
    detached: true,
    stdio: ['ignore', log, log, 'pipe'],
    env: { ...process.env, [NOTIFY_FD_ENV]: '3' },
  });
  closeSync(log);
  const pipe = child.stdio[3] as NodeJS.ReadableStream;
  let text = '';
  let line = '';
  pipe.setEncoding('utf8');
  // NOTE lines (what the attach recovered) go to stderr; READY or ERROR ends the wait.
  const next = () => {
    for (let nl = text.indexOf('\n'); nl >= 0; nl = text.indexOf('\n')) {
      const l = text.slice(0, nl);
      text = text.slice(nl + 1);
      if (l.startsWith('NOTE ')) process.stderr.write(`ulobdev: ${device}: ${l.slice('NOTE '.length)}\n`);
      else return l;
    }
    return null;
  };
  for await (const chunk of pipe) {
    text += chunk as string;
    const l = next();
    if (l !== null) {
      line = l;
      break;
    }
  }
  child.unref();
  (pipe as unknown as { destroy(): void }).destroy();
  if (line.startsWith('READY ')) {
    process.stdout.write(`${line.slice('READY '.length)}\n`);
    return;
  }
  const failed = /^ERROR (\S+) (.*)$/.exec(line);
  // The child undid its attach before it said so: as refused as a foreground attach.
  if (failed) throw undone(errorFromCode(failed[1]!, failed[2]!));
  throw new DaemonError(`the daemon exited before it was ready; see ${logPath}`);
}

/**
 * An attach failed (Daemon.start undid what it began): tells a waiting --daemon parent, with the
 * error's code, and returns the error marked as rolled back, for `throw`.
 */
export function attachFailed(err: unknown): unknown {
  notifyParent(`ERROR ${errorToWire(err).code} ${oneLine(err)}`);
  return undone(err);
}

/** In a --daemon child: tells the waiting parent READY or ERROR, once. */
export function notifyParent(message: string): void {
  const fd = Number(process.env[NOTIFY_FD_ENV]);
  if (!Number.isInteger(fd) || fd <= 2) return;
  try {
    writeSync(fd, `${message}\n`);
    closeSync(fd);
  } catch {
    // The parent is gone; nothing to tell.
  }
  delete process.env[NOTIFY_FD_ENV];
}

/** In a --daemon child: a line for the waiting parent to print on stderr before READY. */
export function noteParent(message: string): void {
  const fd = Number(process.env[NOTIFY_FD_ENV]);
  if (!Number.isInteger(fd) || fd <= 2) return;
  try {
    writeSync(fd, `NOTE ${message}\n`);
  } catch {
    // The parent is gone; nothing to tell.
  }
}

/** True in a --daemon child that has not reported yet (its stdout is the log, not the user's). */
export function hasWaitingParent(): boolean {
  return process.env[NOTIFY_FD_ENV] !== undefined;
}
