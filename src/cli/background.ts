// What ulobdev and ulohttp share as daemons: the logger, `--daemon` (start in the background and
// return once the device is ready, as losetup does) and the READY or ERROR CODE line the child
// sends back.
import { spawn } from 'node:child_process';
import { closeSync, fstatSync, openSync, promises as fsp, writeSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join, resolve } from 'node:path';
import type { Command } from 'commander';
import pino, { type Logger } from 'pino';
import type PinoPretty from 'pino-pretty';
import { DaemonError, errorFromCode, errorToWire } from '../errors.js';
import { defaultName } from '../bdev/frontend.js';
import { RUN_DIR } from '../paths.js';
import { nameUnknownErrno } from '../errno.js';
import { redirectStdio } from '../native/process.js';
import { undone } from './exit-codes.js';

const NOTIFY_FD_ENV = 'ULOBDEV_NOTIFY_FD';
/** The --daemon child's log path (RUN_DIR/NAME.log, its stdout and stderr), for the SIGHUP reopen. */
const LOG_FILE_ENV = 'ULOBDEV_LOG_FILE';
// pino-pretty is loaded only for a log on a terminal: importing it costs every command (status,
// detach, a --daemon start) about a fifth of its start-up time.
const requireCjs = createRequire(import.meta.url);

/** The --log-level values, most severe first (pino's levels a user would pick). */
export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug'] as const;

/** Where a daemon's log goes: a person's terminal (pretty lines), systemd's journal, or JSON lines. */
export type LogTarget = 'terminal' | 'journal' | 'json';

/** This run's LogTarget: a foreground run on a terminal, stderr that is the journal, or anything else. */
export function logTarget(): LogTarget {
  return logsToTerminal() ? 'terminal' : logsToJournal() ? 'journal' : 'json';
}

/**
 * The daemon's logger on stderr, by `target` (logTarget()): one JSON object per line ('json': a
 * --daemon log file or a pipe); the message alone with its syslog priority prefix ('journal');
 * pino-pretty's human-readable lines ('terminal': a foreground run on a terminal).
 * Both write synchronously, so the last line before an exit is never lost.
 */
export function makeLogger(level: string, target: LogTarget = 'json'): Logger {
  if (target === 'journal') {
    // systemd's journal stamps time, pid and unit itself: the message alone, one line per event,
    // led by its syslog priority (sd-daemon(3) SD_ERR..SD_DEBUG prefixes, which journald reads on
    // stderr by default: SyslogLevelPrefix=yes). Fields stay out; an error's stack still follows.
    const pretty = requireCjs('pino-pretty') as typeof PinoPretty;
    const stream = pretty({
      destination: 2,
      sync: true,
      colorize: false,
      hideObject: true,
      ignore: 'pid,hostname,time,level,device,name',
      messageFormat: (log, key) => `<${journalPriority(Number(log['level']))}>${String(log[key] ?? '')}`,
    });
    return pino({ level, base: { pid: process.pid } }, stream);
  }
  if (target === 'terminal') {
    // One daemon, one device, which the user just typed: lines without the device and pid.
    const pretty = requireCjs('pino-pretty') as typeof PinoPretty;
    const stream = pretty({ destination: 2, sync: true, colorize: true, translateTime: 'SYS:HH:MM:ss', ignore: 'pid,hostname,device,name' });
    return pino({ level, base: { pid: process.pid } }, stream);
  }
  return pino({ level, base: { pid: process.pid } }, pino.destination({ fd: 2, sync: true }));
}

/**
 * In a --daemon child, whose stdout and stderr are RUN_DIR/NAME.log: SIGHUP reopens that path
 * (created again, mode 0600, if it was moved away) and points both there, so logrotate can rotate
 * it (contrib/logrotate/ulobdev sends the SIGHUP). Without it the log grew for ever in /run, which
 * is RAM. A foreground daemon logs to stderr (a terminal, the journal): SIGHUP is left as it is.
 */
export function reopenLogOnHangup(logger: Logger): void {
  const path = process.env[LOG_FILE_ENV];
  if (!path) return;
  delete process.env[LOG_FILE_ENV]; // not for the helpers it starts
  process.on('SIGHUP', () => {
    try {
      const fd = openSync(path, 'a', 0o600);
      try {
        redirectStdio(fd);
      } finally {
        closeSync(fd);
      }
      logger.info({ signal: 'SIGHUP' }, `reopened the log ${path}`);
    } catch (err) {
      logger.error(`cannot reopen the log ${path} on SIGHUP: ${oneLine(err)}; still writing the old one`);
    }
  });
}

/** pino's numeric level as a syslog priority (3 err, 4 warning, 6 info, 7 debug; fatal is 2, crit). */
export function journalPriority(level: number): number {
  if (level >= 60) return 2;
  if (level >= 50) return 3;
  if (level >= 40) return 4;
  if (level >= 30) return 6;
  return 7;
}

/**
 * True when stderr is systemd's journal: $JOURNAL_STREAM ("DEVICE:INODE", systemd.exec(5)) names
 * the file stderr is. A --daemon child (its stderr is the log file) and a pipe say false.
 */
export function logsToJournal(): boolean {
  const stream = process.env['JOURNAL_STREAM'];
  if (!stream || hasWaitingParent()) return false;
  try {
    const st = fstatSync(2);
    return stream === `${st.dev}:${st.ino}`;
  } catch {
    return false;
  }
}

/** True when this run's log goes to a person: a foreground run (no --daemon parent) on a terminal. */
export function logsToTerminal(): boolean {
  return process.stderr.isTTY === true && !hasWaitingParent();
}

/**
 * The first line of an error's message: what the CLI prints. A system error libuv has no name for
 * ("Unknown system error -116") is put as its errno's name and description ("ESTALE: stale file
 * handle").
 */
export function oneLine(err: unknown): string {
  const message = err instanceof Error ? err.message : String(err);
  return nameUnknownErrno(message.split('\n')[0]!, err);
}

/** The warnings of this command, held until it is accepted (sayWarnings). */
const heldWarnings: string[] = [];

/**
 * A warning about the command line, `PROG: warning: ...` on stderr, held until the attach is
 * accepted (sayWarnings): a refused attach prints its one line and nothing else (invariant 6;
 * newuser12: a too-frequent --flush was warned about, then the missing --writeback refused).
 */
export function warn(program: string, message: string): void {
  heldWarnings.push(`${program}: warning: ${message}`);
}

/** Prints the held warnings: the attach was accepted (READY from a --daemon child, a foreground start). */
export function sayWarnings(): void {
  for (const w of heldWarnings.splice(0)) process.stderr.write(`${w}\n`);
}

/**
 * The arguments that run `command` again exactly as the user's command line was parsed, for the
 * --daemon child: the command's name, every option given on the command line (not defaults) as
 * `--long=VALUE` (so a value that looks like an option stays a value), `--`, then `positional`.
 * Options whose attribute name is in `omit` stay out: --daemon itself, and secrets, which travel
 * in the child's environment instead (only its owner can read /proc/PID/environ; anyone can read
 * /proc/PID/cmdline).
 */
export function childArgs(command: Command, positional: readonly string[], omit: readonly string[]): string[] {
  const args = [command.name()];
  for (const option of command.options) {
    const key = option.attributeName();
    if (omit.includes(key) || command.getOptionValueSource(key) !== 'cli') continue;
    const value: unknown = command.getOptionValue(key);
    const long = option.long!;
    if (option.negate) {
      if (value === false) args.push(long);
    } else if (option.isBoolean()) {
      if (value === true) args.push(long);
    } else if (Array.isArray(value)) {
      for (const v of value) args.push(`${long}=${String(v)}`);
    } else if (value === true) {
      args.push(long);
    } else if (value !== undefined) {
      args.push(`${long}=${String(value)}`);
    }
  }
  return [...args, '--', ...positional];
}

export interface DaemonizeOptions {
  name?: string;
  runDir?: string;
  /** The child's arguments after its script (childArgs); the script is this process's own. */
  args: readonly string[];
  /** Extra environment for the child (secrets kept out of its argv). */
  env?: Record<string, string>;
  /** The program and script to run; this process's by default (tests run another). */
  command?: readonly string[];
}

/**
 * Runs the command again in the background (childArgs, without --daemon) as a detached child whose
 * output goes to RUN_DIR/NAME.log, and waits for its READY or ERROR line on an inherited pipe
 * (fd 3). READY prints the device and resolves; ERROR CODE MESSAGE throws that error (exit 1: the
 * child undid its attach). A child that exits without a word throws DaemonError with the last
 * thing it wrote to its log: the cause, on the user's terminal, not only in the log.
 */
export async function daemonize(device: string, options: DaemonizeOptions): Promise<void> {
  const runDir = options.runDir ?? RUN_DIR;
  const madeRunDir = await fsp.mkdir(runDir, { recursive: true, mode: 0o700 });
  const logPath = join(runDir, `${options.name ?? defaultName(device)}.log`);
  const logExisted = await fsp.stat(logPath).then(() => true, () => false);
  const log = openSync(logPath, 'a', 0o600);
  const logStart = (await fsp.stat(logPath)).size;
  const [program, ...pre] = options.command ?? [process.execPath, ...process.execArgv, process.argv[1]!];
  const child = spawn(program!, [...pre, ...options.args], {
    detached: true,
    stdio: ['ignore', log, log, 'pipe'],
    env: { ...process.env, ...options.env, [NOTIFY_FD_ENV]: '3', [LOG_FILE_ENV]: resolve(logPath) },
  });
  closeSync(log);
  const exited = new Promise<string>((resolve) => {
    child.once('error', (err) => resolve(err.message));
    child.once('exit', (code, signal) => resolve(signal ? `was killed by ${signal}` : `exited with status ${code}`));
  });
  // How the child ended, or after 5 s that it still runs (it closed the pipe but lives on).
  const ended = async () => {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<string>((r) => (timer = setTimeout(() => r('closed its pipe'), 5000)));
    try {
      return await Promise.race([exited, timeout]);
    } finally {
      clearTimeout(timer);
    }
  };
  const pipe = child.stdio[3] as NodeJS.ReadableStream;
  let text = '';
  let line = '';
  pipe.setEncoding('utf8');
  // NOTE lines (what the attach recovered) go to stderr; READY or ERROR ends the wait. A notice
  // names the device only when DEVICE named one: `/dev/loop` is not the device it got (newuser9b),
  // and each notice names the disk itself.
  const where = /^\/dev\/(loop|ublkb)$/.test(device) ? '' : `${device}: `;
  // Held until the child says READY: a refused attach prints its one line and nothing else (a
  // clamp notice before a refusal read like an acceptance: newuser10b).
  const notes: string[] = [];
  const printNotes = () => {
    for (const n of notes) process.stderr.write(`ulobdev: ${where}${n}\n`);
  };
  const next = () => {
    for (let nl = text.indexOf('\n'); nl >= 0; nl = text.indexOf('\n')) {
      const l = text.slice(0, nl);
      text = text.slice(nl + 1);
      if (l.startsWith('NOTE ')) notes.push(l.slice('NOTE '.length));
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
  (pipe as unknown as { destroy(): void }).destroy();
  if (line.startsWith('READY ')) {
    sayWarnings();
    printNotes();
    child.unref();
    process.stdout.write(`${line.slice('READY '.length)}\n`);
    return;
  }
  const failed = /^ERROR (\S+) (.*)$/.exec(line);
  // The child undid its attach before it said so: as refused as a foreground attach.
  if (failed) {
    // A refused attach changes nothing, its log included: the error is on the user's terminal.
    await ended();
    child.unref();
    if (logExisted) await fsp.truncate(logPath, logStart).catch(() => undefined);
    else await fsp.rm(logPath, { force: true });
    if (madeRunDir) await fsp.rmdir(madeRunDir).catch(() => undefined);
    throw undone(errorFromCode(failed[1]!, failed[2]!));
  }
  // No word on the pipe: the child died (a crash, a signal, an error before it could report).
  printNotes();
  const how = await ended();
  child.unref();
  const cause = lastLogMessage((await fsp.readFile(logPath, 'utf8').catch(() => '')).slice(logStart));
  throw new DaemonError(`the daemon ${how} before it was ready${cause ? `: ${cause}` : ''} (log: ${logPath})`);
}

/**
 * The last thing worth showing in a stretch of daemon log: the `msg` (and error message) of the
 * last JSON line of level warn or above, or else the last plain line (a CLI's `PROG: ...`, a
 * stack's first line), without its program prefix.
 */
export function lastLogMessage(text: string): string | undefined {
  const lines = text.split('\n').map((l) => l.trim()).filter(Boolean);
  for (let i = lines.length - 1; i >= 0; i--) {
    const l = lines[i]!;
    if (!l.startsWith('{')) {
      if (/^\s*at /.test(l)) continue;
      return l.replace(/^(ulobdev|ulohttp): /, '');
    }
    try {
      const entry = JSON.parse(l) as { level?: number; msg?: string; err?: { message?: string } };
      if ((entry.level ?? 0) < 40) continue;
      return [entry.msg, entry.err?.message].filter(Boolean).join(': ') || undefined;
    } catch {
      return l;
    }
  }
  return undefined;
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
