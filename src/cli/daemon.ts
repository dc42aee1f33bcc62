// One attached device: backing source → cache store → engine → NBD server → frontend, plus the
// control socket. Started in that order, torn down in the reverse one.
import { promises as fsp } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import type { Logger } from 'pino';
import { CacheEngine } from '../cache/engine.js';
import { CacheStore, type CachePaths } from '../cache/store.js';
import { UlobError } from '../errors.js';
import type { Source } from '../source/source.js';
import { defaultName, frontendKind, ModuleMissingError, type Frontend, type FrontendKind } from '../bdev/frontend.js';
import { assertLoopFree, attachLoop } from '../bdev/loop-fuse.js';
import { assertNbdFree, attachNbdDevice } from '../bdev/nbd-device.js';
import { NbdServer, parseNbdUrl } from '../bdev/nbd/index.js';
import { flushDirty, type FlushResult } from '../writeback/flusher.js';
import { assertNoDaemon, ControlServer, type ControlRequest } from './control.js';

export const STATE_DIR = '/var/lib/ulobdev';
export const RUN_DIR = '/run/ulobdev';
export const EXPORT_NAME = 'ulobdev';

export interface AttachOptions {
  device: string;
  /** Opens the source behind the cache (the backing disk, an HTTP image, a user callback). */
  openSource: (options: { writable: boolean }) => Promise<Source>;
  cache?: string;
  bitmap?: string;
  metadata?: string;
  writeback: boolean;
  blockSize?: number;
  name?: string;
  stateDir?: string;
  runDir?: string;
  logger: Logger;
}

export interface DeviceStatus {
  name: string;
  device: string;
  frontend: FrontendKind;
  backing: string;
  mode: string;
  size: number;
  blockSize: number;
  cachedBytes: number;
  cacheFillPercent: number;
  dirtyBytes: number;
  flushEpoch: number;
  uptimeSeconds: number;
  pid: number;
  paths: CachePaths;
  /** The source's own counters, if it keeps any. */
  source?: Record<string, number | string | boolean>;
}

export class NotRootError extends UlobError {
  constructor(device: string) {
    super('ULOB_E_NOT_ROOT', `binding ${device} needs root; run ulobdev as root (or serve an NBD URL instead)`);
  }
}

export class Daemon {
  readonly name: string;
  readonly device: string;
  readonly engine: CacheEngine;
  readonly #source: Source;
  readonly #server: NbdServer;
  readonly #frontend: Frontend;
  readonly #control: ControlServer;
  readonly #logger: Logger;
  readonly #started = Date.now();
  readonly #runDir: string;
  #detaching: Promise<void> | null = null;
  readonly #done: Promise<void>;
  #resolveDone!: () => void;

  private constructor(parts: {
    name: string;
    device: string;
    engine: CacheEngine;
    source: Source;
    server: NbdServer;
    frontend: Frontend;
    control: ControlServer;
    logger: Logger;
    runDir: string;
  }) {
    this.name = parts.name;
    this.device = parts.device;
    this.engine = parts.engine;
    this.#source = parts.source;
    this.#server = parts.server;
    this.#frontend = parts.frontend;
    this.#control = parts.control;
    this.#logger = parts.logger;
    this.#runDir = parts.runDir;
    this.#done = new Promise((r) => (this.#resolveDone = r));
  }

  /** Resolves once the device is detached and everything is closed. */
  get done(): Promise<void> {
    return this.#done;
  }

  static async start(options: AttachOptions): Promise<Daemon> {
    const kind = frontendKind(options.device);
    if (kind === 'uloop') {
      throw new ModuleMissingError(`${options.device} needs the uloop kernel module, which this build does not have yet; use /dev/loopN`);
    }
    if (kind !== 'serve' && process.getuid?.() !== 0) throw new NotRootError(options.device);
    const name = options.name ?? defaultName(options.device);
    if (!/^[A-Za-z0-9._-]+$/.test(name)) throw new UlobError('ULOB_E_INVALID_ARG', `--name may hold letters, digits, '.', '_' and '-' only`);
    const runBase = options.runDir ?? RUN_DIR;
    const runDir = join(runBase, name);
    const logger = options.logger.child({ device: name });
    // Everything that can refuse DEVICE is checked before the cache is opened or created.
    if (kind === 'loop') await assertLoopFree(options.device);
    if (kind === 'nbd') await assertNbdFree(options.device);
    if (kind === 'serve') parseNbdUrl(options.device);
    await assertNoDaemon(join(runBase, `${name}.sock`));
    const undo: Array<() => Promise<unknown>> = [];
    try {
      const source = await options.openSource({ writable: options.writeback });
      undo.push(() => source.close());
      const paths = cachePaths(options, source.id);
      await fsp.mkdir(dirname(paths.cache), { recursive: true, mode: 0o700 });
      await fsp.mkdir(dirname(paths.bitmap), { recursive: true, mode: 0o700 });
      const store = await CacheStore.open({
        paths,
        backing: source,
        mode: options.writeback ? 'writeback' : 'readonly',
        blockSize: options.blockSize,
      });
      if (store.recoveredFromCrash) logger.warn('the cache was not closed cleanly last time; recovered its dirty set from the metadata');
      const engine = new CacheEngine(store, source);
      undo.push(() => engine.close());

      await fsp.mkdir(runDir, { recursive: true, mode: 0o700 });
      const server = new NbdServer({ backend: engine, exportName: EXPORT_NAME, description: `ulobdev cache of ${source.description}`, logger });
      const address = kind === 'serve' ? parseNbdUrl(options.device) : { path: join(runDir, 'nbd.sock') };
      await server.listen(address);
      undo.push(() => server.close());

      const readOnly = !options.writeback;
      const socket = 'path' in address ? address.path : '';
      let frontend: Frontend;
      if (kind === 'loop') frontend = await attachLoop({ device: options.device, socket, runDir, readOnly, logger });
      else if (kind === 'nbd') frontend = await attachNbdDevice({ device: options.device, socket, exportName: EXPORT_NAME, readOnly });
      else frontend = { kind: 'serve', device: options.device, detach: async () => undefined };
      undo.push(() => frontend.detach());

      let daemon: Daemon | undefined;
      const control = await ControlServer.listen(join(runBase, `${name}.sock`), (req) => daemon!.#handle(req));
      daemon = new Daemon({ name, device: options.device, engine, source, server, frontend, control, logger, runDir });
      logger.info({ backing: source.description, cache: paths.cache, mode: store.mode }, 'attached');
      return daemon;
    } catch (err) {
      for (const step of undo.reverse()) await step().catch(() => undefined);
      await fsp.rm(runDir, { recursive: true, force: true }).catch(() => undefined);
      throw err;
    }
  }

  status(): DeviceStatus {
    const s = this.engine.stats();
    const cachedBytes = Math.min(s.presentBlocks * s.blockSize, s.size);
    return {
      name: this.name,
      device: this.device,
      frontend: this.#frontend.kind,
      backing: this.#source.description,
      mode: s.mode,
      size: s.size,
      blockSize: s.blockSize,
      cachedBytes,
      cacheFillPercent: Math.round((s.presentBlocks / s.blocks) * 1000) / 10,
      dirtyBytes: Math.min(s.dirtyBlocks * s.blockSize, s.size),
      flushEpoch: s.flushEpoch,
      uptimeSeconds: Math.round((Date.now() - this.#started) / 1000),
      pid: process.pid,
      paths: this.engine.store.paths,
      source: this.#source.stats?.(),
    };
  }

  /** Writes the dirty blocks back to the backing disk now, in one sorted pass. */
  async flush(): Promise<FlushResult> {
    const result = await flushDirty(this.engine);
    this.#logger.info(result, 'flushed dirty blocks to the backing disk');
    return result;
  }

  /**
   * Stops the frontend (refused while the device is mounted), drains in-flight I/O, persists the
   * metadata and closes everything. Concurrent calls share one detach.
   */
  detach(): Promise<void> {
    this.#detaching ??= this.#detach().catch((err: unknown) => {
      this.#detaching = null;
      throw err;
    });
    return this.#detaching;
  }

  async #detach(): Promise<void> {
    await this.#frontend.detach();
    await this.#server.close();
    await this.engine.close();
    await this.#source.close();
    await this.#control.close();
    await fsp.rm(this.#runDir, { recursive: true, force: true });
    this.#logger.info('detached');
    this.#resolveDone();
  }

  async #handle(request: ControlRequest): Promise<Record<string, unknown>> {
    switch (request.cmd) {
      case 'status':
        return { status: this.status() };
      case 'detach':
        await this.detach();
        return {};
      case 'flush':
        return { flush: await this.flush() };
      default:
        throw new UlobError('ULOB_E_INVALID_ARG', `unknown control command ${JSON.stringify(request.cmd)}`);
    }
  }
}

/** -c/-b default to files under /var/lib/ulobdev named after the backing identity. */
export function cachePaths(options: Pick<AttachOptions, 'cache' | 'bitmap' | 'metadata' | 'stateDir'>, backingId: string): CachePaths {
  const stem = join(options.stateDir ?? STATE_DIR, backingId.replace(/[^A-Za-z0-9._-]+/g, '_'));
  const cache = resolve(options.cache ?? `${stem}.cache`);
  return {
    cache,
    bitmap: resolve(options.bitmap ?? (options.cache ? `${cache}.bitmap` : `${stem}.bitmap`)),
    metadata: resolve(options.metadata ?? `${cache}.meta`),
  };
}

/** Control socket of an attached device, from its DEVICE argument or --name. */
export function controlSocket(deviceOrName: string, runDir = RUN_DIR): string {
  const name = deviceOrName.includes('/') || deviceOrName.includes(':') ? defaultName(deviceOrName) : deviceOrName;
  return join(runDir, `${name}.sock`);
}
