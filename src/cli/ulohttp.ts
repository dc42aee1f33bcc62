#!/usr/bin/env node
// ulohttp: a disk image on an HTTP(S) server as a local, read-only block device; blocks are fetched
// with Range requests the first time they are read and served from the local cache afterwards.
//   ulohttp [-c CACHE] [-b BITMAP] [--daemon] [--header 'K: V']... [--cacert FILE] [--revalidate] DEVICE URL
//   ulohttp status [DEVICE] [--json]     (same as ulobdev status)
//   ulohttp detach DEVICE                (same as ulobdev detach)
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import { join } from 'node:path';
import { Command, CommanderError, InvalidArgumentError as CommanderInvalidArgument } from 'commander';
import { CacheStore } from '../cache/store.js';
import { ForeignCacheError, ImageChangedError, InvalidArgumentError, SizeMismatchError } from '../errors.js';
import { setIoFlusher } from '../native/process.js';
import { attachFailed, daemonize, hasWaitingParent, makeLogger, notifyParent, oneLine } from './background.js';
import { exitCodeFor } from './exit-codes.js';
import { openHttpSource, type HttpSource } from '../source/http.js';
import { parseHeaders, redactUrl } from '../source/http-range.js';
import { cachePaths, Daemon } from '../daemon/daemon.js';
import { STATE_DIR } from '../paths.js';
import { main as ulobdevMain } from './ulobdev.js';
import { parseSize } from '../units.js';
import { parseRate } from '../writeback/policy.js';


interface Flags {
  cache?: string;
  bitmap?: string;
  metadata?: string;
  header: string[];
  cacert?: string;
  revalidate?: boolean;
  connections: number;
  timeout: number;
  readahead: number;
  hydrate?: string | boolean;
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

async function attach(device: string, url: string, flags: Flags): Promise<void> {
  const headers = parseHeaders(flags.header);
  if (flags.cacert) await fsp.access(flags.cacert).catch(() => {
    throw new InvalidArgumentError(`--cacert ${flags.cacert}: no such file`);
  });
  // Checked before anything starts, like every other argument.
  const hydratePolicy = flags.hydrate === undefined ? {} : { hydrateRate: flags.hydrate === true ? 0 : parseRate(String(flags.hydrate)) };
  if (flags.daemon) return daemonize(device, { name: flags.name, runDir: flags.runDir });
  process.umask(0o077);
  const logger = makeLogger(flags.logLevel);
  try {
    setIoFlusher();
  } catch {
    // Logged by nobody: the loop frontend still works; see ulobdev for the warning.
  }
  const paths = cachePaths({ ...flags, cache: flags.cache ?? defaultCacheFor(url, flags.stateDir) }, 'unused');
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
  const onSignal = (signal: string) => {
    logger.info({ signal }, 'detaching');
    daemon.detach().catch((err: unknown) => logger.error(`cannot detach on ${signal}: ${oneLine(err)}; still serving`));
  };
  process.on('SIGTERM', () => onSignal('SIGTERM'));
  process.on('SIGINT', () => onSignal('SIGINT'));
  const source = (daemon.engine.source as HttpSource).stats();
  logger.info({ url: source.url, size: daemon.engine.size, etag: source.etag, lastModified: source.lastModified }, 'serving the image');
  notifyParent(`READY ${device}`);
  if (!hasWaitingParent()) process.stdout.write(`${device}\n`);
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
  const program = new Command('ulohttp').description('a disk image on an HTTP(S) server as a read-only block device, fetched on demand').showHelpAfterError().exitOverride();
  program
    .command('attach', { isDefault: true })
    .description('expose the image at URL as DEVICE')
    .argument('<DEVICE>', '/dev/loopN, /dev/nbdN, nbd+unix:///?socket=PATH or nbd://HOST:PORT')
    .argument('<URL>', 'http:// or https:// URL of a disk or filesystem image (the server must serve byte ranges)')
    .option('-c, --cache <PATH>', 'cache file (default: /var/lib/ulobdev/http-<name>-<hash of URL>.cache)')
    .option('-b, --bitmap <PATH>', 'present bitmap file (default: CACHE.bitmap)')
    .option('--metadata <PATH>', 'metadata database (default: CACHE.meta)')
    .option('-H, --header <K: V>', 'extra request header, e.g. Authorization (repeatable)', (v: string, all: string[]) => [...all, v], [] as string[])
    .option('--cacert <FILE>', 'trust the CAs in this PEM file instead of the system ones')
    .option('--revalidate', 'if the image changed on the server, discard the old cache and start over')
    .option('--connections <N>', 'HTTP connections (requests in flight)', intArg('--connections', 1, 256), 32)
    .option('--timeout <MS>', 'per-request timeout for headers and body gaps, ms', intArg('--timeout', 100, 3_600_000), 30_000)
    .option('--readahead <SIZE>', 'largest readahead window (0 turns it off)', sizeArg, 32 * 1024 * 1024)
    .option('--hydrate [RATE]', 'pull the whole image into the cache in the background, at RATE per second (default 50M)')
    .option('--daemon', 'return once DEVICE is ready and keep serving in the background')
    .option('--name <NAME>', 'name of the control socket (default: from DEVICE)')
    .option('--log-level <LEVEL>', 'fatal, error, warn, info, debug', 'info')
    .addOption(hidden('--state-dir <DIR>'))
    .addOption(hidden('--run-dir <DIR>'))
    .action((device: string, url: string, flags: Flags) => attach(device, url, flags));
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
    // Commander has printed its own usage error (and the help) already.
    if (!(err instanceof CommanderError)) process.stderr.write(`ulohttp: ${oneLine(err)}\n`);
    return exitCodeFor(err);
  }
}

const isEntry = process.argv[1] && import.meta.url === new URL(`file://${await fsp.realpath(process.argv[1]).catch(() => process.argv[1])}`).href;
if (isEntry) process.exitCode = await main(process.argv);
