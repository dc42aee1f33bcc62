#!/usr/bin/env node
// ulohttp: a disk image on an HTTP(S) server as a local, read-only block device; blocks are fetched
// with Range requests the first time they are read and served from the local cache afterwards.
//   ulohttp [-c CACHE] [-b BITMAP] [--daemon] [--header-file FILE] [--header 'K: V']... [--cacert FILE]
//           [--revalidate] [--hydrate] [--hydrate-rate RATE] DEVICE URL
//   (headers also from $ULOHTTP_HEADERS: the way to keep Authorization and Cookie out of argv)
//   ulohttp status [DEVICE] [--json]     (same as ulobdev status)
//   ulohttp detach DEVICE                (same as ulobdev detach)
import { VERSION } from './version.js';
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import { dirname, join } from 'node:path';
import { Command, CommanderError, InvalidArgumentError as CommanderInvalidArgument, Option } from 'commander';
import { CacheStore } from '../cache/store.js';
import { ForeignCacheError, ImageChangedError, InvalidArgumentError, SizeMismatchError } from '../errors.js';
import { setIoFlusher } from '../native/process.js';
import { attachFailed, childArgs, daemonize, hasWaitingParent, LOG_LEVELS, logTarget, makeLogger, notifyParent, oneLine, reopenLogOnHangup, sayWarnings, warn } from './background.js';
import { exitCodeFor } from './exit-codes.js';
import { openHttpSource, type HttpSource } from '../source/http.js';
import { credentialsHeader, formatHeaders, parseHeaders, redactUrl } from '../source/http-range.js';
import { cachePaths, Daemon } from '../daemon/daemon.js';
import { DEVICE_FORMS } from '../bdev/frontend.js';
import { STATE_DIR } from '../paths.js';
import { main as ulobdevMain, nameArg, oneLineErrors } from './ulobdev.js';
import { parseSize } from '../units.js';
import { parseRate } from '../writeback/policy.js';


interface Flags {
  cache?: string;
  bitmap?: string;
  metadata?: string;
  header: string[];
  headerFile?: string;
  cacert?: string;
  revalidate?: boolean;
  connections: number;
  timeout: number;
  readahead: number;
  hydrate?: boolean;
  hydrateRate?: string;
  allowRemote?: boolean;
  daemon?: boolean;
  name?: string;
  logLevel: string;
  stateDir?: string;
  runDir?: string;
}

/** The default cache is named after the URL (not the ETag), so a changed image finds its old cache and is refused. */
export function defaultCacheFor(url: string, stateDir = STATE_DIR): string {
  const u = redactUrl(url);
  const base = (new URL(u).pathname.split('/').pop() || 'image').replace(/[^A-Za-z0-9._-]+/g, '_').slice(0, 64);
  return join(stateDir, `http-${base}-${createHash('sha256').update(u).digest('hex').slice(0, 12)}.cache`);
}

/** The environment variable that carries request headers, one `Name: value` per line. */
export const HEADERS_ENV = 'ULOHTTP_HEADERS';

/** Headers that carry a secret: kept out of argv (world-readable in /proc/PID/cmdline). */
const SECRET_HEADERS = ['authorization', 'proxy-authorization', 'cookie'];

/**
 * Every request header, later sources overriding earlier ones: $ULOHTTP_HEADERS, --header-file,
 * --header. Warns (once each) when a secret came on the command line, where every user of the
 * machine can read it for as long as the command runs.
 */
async function requestHeaders(url: string, flags: Flags): Promise<Record<string, string>> {
  const fromEnv = parseHeaders(splitLines(process.env[HEADERS_ENV] ?? ''), HEADERS_ENV);
  let fromFile: Record<string, string> = {};
  if (flags.headerFile !== undefined) {
    let text: string;
    try {
      text = await fsp.readFile(flags.headerFile, 'utf8');
    } catch (err) {
      throw new InvalidArgumentError(`--header-file ${flags.headerFile}: ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (err as Error).message}`);
    }
    fromFile = parseHeaders(splitLines(text), `--header-file ${flags.headerFile}`);
    const st = await fsp.stat(flags.headerFile);
    if ((st.mode & 0o077) !== 0) warn('ulohttp', `--header-file ${flags.headerFile} can be read by other users (mode ${(st.mode & 0o777).toString(8)}); chmod 600 it`);
  }
  const fromArgv = parseHeaders(flags.header);
  const onArgv = Object.keys(fromArgv).filter((h) => SECRET_HEADERS.includes(h));
  let userinfo = false;
  try {
    const u = new URL(url);
    userinfo = u.username !== '' || u.password !== '';
  } catch {
    // a bad URL is refused when the source opens it
  }
  if (onArgv.length > 0 || userinfo) {
    const what = [...onArgv.map((h) => `the ${h} header`), ...(userinfo ? ['the password in the URL'] : [])].join(' and ');
    warn('ulohttp', `${what} on the command line can be read by every user of this machine (ps, /proc/PID/cmdline); pass it with --header-file FILE or $${HEADERS_ENV} instead`);
  }
  return { ...fromEnv, ...fromFile, ...fromArgv };
}

function splitLines(text: string): string[] {
  return text.split(/\r?\n/).filter((l) => l.trim() !== '' && !l.trimStart().startsWith('#'));
}

async function attach(device: string, url: string, flags: Flags, command: Command): Promise<void> {
  if (/^https?:\/\//i.test(device) && !/^https?:\/\//i.test(url)) {
    throw new InvalidArgumentError(`DEVICE and URL look swapped: the device to create comes first, then the image's URL: ulohttp ${url} ${redactUrl(device)}`);
  }
  const headers = await requestHeaders(url, flags);
  if (flags.cacert) await fsp.access(flags.cacert).catch(() => {
    throw new InvalidArgumentError(`--cacert ${flags.cacert}: no such file`);
  });
  // Checked before anything starts, like every other argument.
  const hydratePolicy = flags.hydrate ? { hydrateRate: flags.hydrateRate === undefined ? 0 : parseRate(flags.hydrateRate) } : {};
  if (flags.daemon) {
    // The child gets its headers (and the URL's credentials) in its environment, not in argv.
    const secrets = { ...credentialsHeader(url), ...headers };
    return daemonize(device, {
      name: flags.name,
      runDir: flags.runDir,
      args: childArgs(command, [device, redactUrl(url)], ['daemon', 'header', 'headerFile']),
      env: { [HEADERS_ENV]: formatHeaders(secrets) },
    });
  }
  process.umask(0o077);
  const target = logTarget();
  const onTerminal = target === 'terminal';
  const logger = makeLogger(flags.logLevel, target);
  reopenLogOnHangup(logger);
  try {
    setIoFlusher();
  } catch {
    // Logged by nobody: the loop frontend still works; see ulobdev for the warning.
  }
  const paths = cachePaths({ ...flags, cache: flags.cache ?? defaultCacheFor(url, flags.stateDir) }, 'unused');
  // The default cache lives in ulobdev's own state directory, made on first use; a directory the
  // user named with -c must exist (Daemon.start refuses it otherwise).
  if (flags.cache === undefined) await fsp.mkdir(dirname(paths.cache), { recursive: true, mode: 0o700 });
  const start = () =>
    Daemon.start({
      device,
      openSource: () =>
        openHttpSource(url, {
          headers,
          caFile: flags.cacert,
          connections: flags.connections,
          timeoutMs: flags.timeout,
          readaheadMax: flags.readahead,
          logger,
        }),
      cache: paths.cache,
      bitmap: paths.bitmap,
      metadata: paths.metadata,
      writeback: false,
      writebackPolicy: hydratePolicy,
      name: flags.name,
      stateDir: flags.stateDir,
      runDir: flags.runDir,
      logger,
      allowRemote: flags.allowRemote,
    });
  let daemon: Daemon;
  try {
    try {
      daemon = await start();
    } catch (err) {
      if (!(err instanceof ForeignCacheError || err instanceof SizeMismatchError)) throw err;
      if (!flags.revalidate) {
        throw new ImageChangedError(
          `the image at ${redactUrl(url)} is not the one ${paths.cache} was made for (it changed on the server); pass --revalidate to discard the cache and start over`,
        );
      }
      await CacheStore.discard(paths, { force: true });
      logger.warn({ cache: paths.cache }, 'the image changed on the server: discarded its old cache (--revalidate)');
      daemon = await start();
    }
  } catch (err) {
    throw attachFailed(err);
  }
  sayWarnings();
  const onSignal = (signal: string) => {
    logger.info({ signal }, 'detaching');
    daemon.detach().catch((err: unknown) => logger.error(`cannot detach on ${signal}: ${oneLine(err)}; still serving`));
  };
  process.on('SIGTERM', () => onSignal('SIGTERM'));
  process.on('SIGINT', () => onSignal('SIGINT'));
  const source = (daemon.engine.source as HttpSource).stats();
  logger.info({ url: source.url, size: daemon.engine.size, etag: source.etag, lastModified: source.lastModified }, 'serving the image');
  // A --daemon parent prints the device itself; the child's stdout is the log.
  // The device it bound: DEVICE may have been `/dev/loop` (take the next free one).
  if (!hasWaitingParent()) process.stdout.write(`${daemon.device}\n`);
  notifyParent(`READY ${daemon.device}`);
  if (onTerminal) process.stderr.write(`${daemon.status().frontend === 'serve' ? `connect to ${daemon.device}` : `mount ${daemon.device}`} from another shell; Ctrl-C detaches\n`);
  await daemon.done;
}

function intArg(what: string, min: number, max: number) {
  return (value: string): number => {
    const n = Number(value);
    if (!Number.isInteger(n) || n < min || n > max) throw new CommanderInvalidArgument(`${what} must be an integer from ${min} to ${max}`);
    return n;
  };
}

function sizeArg(value: string): number {
  try {
    return parseSize(value);
  } catch (err) {
    throw new CommanderInvalidArgument((err as Error).message);
  }
}

function hidden(flags: string) {
  return new Command().createOption(flags).hideHelp();
}

export function buildProgram(): Command {
  const program = oneLineErrors(new Command('ulohttp'))
    .version(VERSION)
    .description('a disk image on an HTTP(S) server as a read-only block device, fetched on demand')
    .usage('[attach] [options] DEVICE URL | <command> [options] [DEVICE|NAME]')
    .addHelpText(
      'after',
      `
Examples:
  ULOHTTP_HEADERS='Authorization: Bearer TOKEN' ulohttp --daemon /dev/loop7 https://example.org/disk.img
      the image as /dev/loop7, its blocks fetched when first read; the token stays out of ps
  ulohttp --hydrate-rate 20M --header-file /etc/ulobdev/image.headers /dev/loop7 https://example.org/disk.img
  ulohttp detach /dev/loop7

'ulohttp attach --help' lists every DEVICE form and every option of the attach form.`,
    )
    .exitOverride();
  program
    .command('attach', { isDefault: true })
    .description('expose the image at URL as DEVICE')
    .argument('<DEVICE>', DEVICE_FORMS)
    .argument('<URL>', 'http:// or https:// URL of a disk or filesystem image (the server must serve byte ranges)')
    .option('-c, --cache <PATH>', 'cache file (default: /var/lib/ulobdev/http-<name>-<hash of URL>.cache)')
    .option('-b, --bitmap <PATH>', 'present bitmap file (default: CACHE.bitmap)')
    .option('--metadata <PATH>', 'metadata database (default: CACHE.meta)')
    .option('-H, --header <K: V>', 'extra request header (repeatable); anyone can read argv: put secrets in --header-file or $ULOHTTP_HEADERS', (v: string, all: string[]) => [...all, v], [] as string[])
    .option('--header-file <FILE>', "request headers, one 'Name: value' per line (# comments), e.g. Authorization; keep it mode 0600")
    .option('--cacert <FILE>', 'trust the CAs in this PEM file instead of the system ones')
    .option('--revalidate', 'if the image changed on the server, discard the old cache and start over')
    .option('--connections <N>', 'HTTP connections (requests in flight)', intArg('--connections', 1, 256), 32)
    .option('--timeout <MS>', 'per-request timeout for headers and body gaps, ms', intArg('--timeout', 100, 3_600_000), 30_000)
    .option('--readahead <SIZE>', 'largest readahead window (0 turns it off)', sizeArg, 32 * 1024 * 1024)
    .option('--hydrate', 'pull the whole image into the cache in the background')
    .addOption(new Option('--hydrate-rate <RATE>', 'at most RATE per second, e.g. 50M (implies --hydrate; default: unlimited)').implies({ hydrate: true }))
    .option('--allow-remote', 'let an nbd://HOST:PORT DEVICE listen on an address other machines reach (no authentication, no encryption)')
    .option('--daemon', 'return once DEVICE is ready and keep serving in the background')
    .option('--name <NAME>', 'name for status and detach, and of the control socket (default: from DEVICE)', nameArg)
    .addOption(new Option('--log-level <LEVEL>', 'how much the log says').choices(LOG_LEVELS).default('info'))
    .addOption(hidden('--state-dir <DIR>'))
    .addOption(hidden('--run-dir <DIR>'))
    .action((device: string, url: string, flags: Flags, command: Command) => attach(device, url, flags, command));
  // status and detach talk to the same control sockets as ulobdev's: delegate.
  for (const cmd of ['status', 'detach']) {
    program
      .command(cmd, { hidden: false })
      .description(`same as ulobdev ${cmd}`)
      .allowUnknownOption()
      .helpOption(false)
      .argument('[ARGS...]')
      .action(async (args: string[]) => {
        const code = await ulobdevMain([process.argv[0]!, 'ulobdev', cmd, ...args]);
        if (code !== 0) throw new CommanderError(code, 'ulohttp.delegated', '');
      });
  }
  return program;
}

export async function main(argv: string[]): Promise<number> {
  try {
    await buildProgram().parseAsync(argv);
    return 0;
  } catch (err) {
    if (err instanceof CommanderError && err.code === 'ulohttp.delegated') return err.exitCode;
    // Commander has printed its own usage error (one line) already.
    if (!(err instanceof CommanderError)) process.stderr.write(`ulohttp: ${oneLine(err)}\n`);
    // A --daemon child that failed before it could start (no-op once it has reported): the
    // parent shows this as the refusal it is, not as a daemon that died.
    if (hasWaitingParent()) attachFailed(err instanceof CommanderError ? new InvalidArgumentError(err.message.replace(/^error: /, '')) : err);
    return exitCodeFor(err);
  }
}

const isEntry = process.argv[1] && import.meta.url === new URL(`file://${await fsp.realpath(process.argv[1]).catch(() => process.argv[1])}`).href;
if (isEntry) process.exitCode = await main(process.argv);
