// The library API: put any source of bytes behind the cache and expose it as a block device.
// The 2008 seed's `ulo_init(store)` / `ulo_loop()` in TypeScript: you give a size, an identity and
// a function that fills a range; ulobdev does the cache, the bitmap, the NBD server and the device.
//
//   import { createDevice } from 'ulobdev';
//   const dev = await createDevice({
//     device: '/dev/loop7',
//     cache: '/var/tmp/gen.cache',
//     source: { size: 1 << 30, id: 'generated:v1', read: (buf, offset) => fill(buf, offset) },
//   });
//   ... mount dev.device, read it ...
//   await dev.detach();
//
// See docs/library.md.
import pino, { type Logger } from 'pino';
import { Daemon, type DeviceStatus } from './daemon/daemon.js';
import { InvalidArgumentError } from './errors.js';
import type { Source } from './source/source.js';

export type { Source, WritableSource } from './source/source.js';
export { isWritable } from './source/source.js';
export { HttpSource, openHttpSource, type HttpSourceOptions } from './source/http.js';
export { openBacking, type OpenBackingOptions } from './source/backing.js';
export { FileSource } from './source/file-source.js';
// Every error class, one per stable code (src/errors.ts), and the table of codes and kinds.
export {
  UlobError,
  ERROR_CODES,
  type ErrorKind,
  InvalidArgumentError,
  SizeMismatchError,
  ForeignCacheError,
  CorruptMetadataError,
  CacheBusyError,
  DeviceBusyError,
  DirtyDataError,
  ReadOnlyError,
  NotRootError,
  PermissionDeniedError,
  NotAttachedError,
  ModuleMissingError,
  ModuleRejectedError,
  ModuleVersionError,
  MissingProgramError,
  NoRangeSupportError,
  ImageChangedError,
  NbdProtocolError,
  IOFailedError,
  HttpError,
  EngineClosedError,
  DiskPowerError,
  CommandFailedError,
  FuseError,
  DaemonError,
  DaemonTimeoutError,
  ControlProtocolError,
  InternalError,
  UnknownDaemonError,
} from './errors.js';
export type { DeviceStatus } from './daemon/daemon.js';

/**
 * A source given as a callback: the user's `read` fills `buf` with the bytes at `offset`
 * (exactly `buf.length` of them, never past `size`), or returns them.
 */
export interface CallbackSource {
  /** Size of the device in bytes; fixed. */
  size: number;
  /**
   * Identity of the content, stored with the cache: a cache made for one id is refused for any
   * other, so change it whenever the content changes (e.g. a version or a content hash).
   */
  id: string;
  /** Shown in status and messages. Default: the id. */
  description?: string;
  /** Fills buf with the bytes at [offset, offset + buf.length); may instead return those bytes. */
  read(buf: Buffer, offset: number): void | Uint8Array | Promise<void | Uint8Array>;
  /** Called once when the device is detached. */
  close?(): void | Promise<void>;
}

export interface CreateDeviceOptions {
  /** `/dev/loopN`, `/dev/nbdN` (both need root), or `nbd+unix:///?socket=PATH` / `nbd://127.0.0.1:PORT`. */
  device: string;
  /** Where the bytes come from: a Source (HttpSource, openBacking(), your own) or a callback source. */
  source: Source | CallbackSource | (() => Promise<Source>);
  /** Cache file; the bitmap and metadata go next to it unless given. Default: under stateDir, named after the source id. */
  cache?: string;
  bitmap?: string;
  metadata?: string;
  /** Cache block size of a new cache (4 KiB to 1 MiB; default 4 KiB). */
  blockSize?: number;
  /** Name of the control socket, so `ulobdev status NAME` finds it. Default: from device. */
  name?: string;
  /** Default /var/lib/ulobdev. */
  stateDir?: string;
  /** Default /run/ulobdev. */
  runDir?: string;
  /** A pino logger; default: warnings and errors to stderr. */
  logger?: Logger;
}

/** An attached device. */
export interface DeviceHandle {
  /** What was attached, e.g. /dev/loop7. */
  readonly device: string;
  /** The control socket's name (`ulobdev status NAME`). */
  readonly name: string;
  /** Cache fill, sizes, paths and the source's own counters. */
  status(): DeviceStatus;
  /** Unbinds the device (refused while it is mounted), persists the cache, closes the source. */
  detach(): Promise<void>;
  /** Resolves once the device is detached, by detach(), `ulobdev detach` or a signal handler. */
  readonly done: Promise<void>;
}

/**
 * Creates a read-only cached block device over `source`. Each block is read from the source once,
 * the first time anything reads it; afterwards it comes from the cache file, across restarts.
 */
export async function createDevice(options: CreateDeviceOptions): Promise<DeviceHandle> {
  const logger = options.logger ?? pino({ level: 'warn' }, pino.destination({ fd: 2, sync: true }));
  const daemon = await Daemon.start({
    device: options.device,
    openSource: async () => toSource(options.source),
    cache: options.cache,
    bitmap: options.bitmap,
    metadata: options.metadata,
    blockSize: options.blockSize,
    writeback: false,
    name: options.name,
    stateDir: options.stateDir,
    runDir: options.runDir,
    logger,
  });
  return {
    device: daemon.device,
    name: daemon.name,
    status: () => daemon.status(),
    detach: async () => void (await daemon.detach()),
    done: daemon.done,
  };
}

/** Wraps a callback source as a Source, checking what the callback gives back. */
export function callbackSource(spec: CallbackSource): Source {
  if (!Number.isSafeInteger(spec.size) || spec.size <= 0) throw new InvalidArgumentError(`source.size must be a positive integer, got ${spec.size}`);
  if (typeof spec.id !== 'string' || spec.id === '') throw new InvalidArgumentError('source.id must be a non-empty string');
  if (typeof spec.read !== 'function') throw new InvalidArgumentError('source.read must be a function');
  const description = spec.description ?? spec.id;
  let reads = 0;
  let bytes = 0;
  return {
    size: spec.size,
    id: `user:${spec.id}`,
    description,
    async readAt(buf: Uint8Array, position: number): Promise<void> {
      const target = Buffer.isBuffer(buf) ? buf : Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
      const out = await spec.read(target, position);
      if (out !== undefined && out !== target) {
        if (out.byteLength !== buf.byteLength) {
          throw new InvalidArgumentError(`${description}: read(${position}) returned ${out.byteLength} bytes, not ${buf.byteLength}`);
        }
        buf.set(out);
      }
      reads++;
      bytes += buf.byteLength;
    },
    async close(): Promise<void> {
      await spec.close?.();
    },
    stats: () => ({ reads, bytesRead: bytes }),
  };
}

async function toSource(source: CreateDeviceOptions['source']): Promise<Source> {
  if (typeof source === 'function') return source();
  if (typeof (source as Source).readAt === 'function') return source as Source;
  return callbackSource(source as CallbackSource);
}
