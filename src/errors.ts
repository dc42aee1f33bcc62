// Every error ulobdev raises on purpose, in one place (as undici's lib/core/errors.js): one class
// per stable `code`, and each code of one kind, which says what the failure means for whoever
// gets it (the CLI turns kinds into exit codes, see src/cli/exit-codes.ts). The message is one
// line a user can act on; the CLI prints exactly that line.
//
// Kinds:
//   refused   bad input, or a refusal: a busy, foreign or missing device, disk, cache or module.
//             Nothing was changed.
//   io        an I/O error of the disk, the cache, the network or a helper program.
//   daemon    the daemon did not answer: it exited, or stopped answering.
//   internal  a bug, or an answer this version does not understand.
import { systemErrorCode } from './errno.js';

export type ErrorKind = 'refused' | 'io' | 'daemon' | 'internal';

/** Base of every ulobdev error; only the classes below make one. */
export abstract class UlobError extends Error {
  /** Stable identifier, e.g. ULOB_E_FOREIGN_CACHE: match on it, not on the message. */
  readonly code: string;

  protected constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
  }

  /** What kind of failure this is (ERROR_CODES); 'internal' for a code this version does not know. */
  get kind(): ErrorKind {
    return ERROR_CODES[this.code]?.kind ?? 'internal';
  }

  override get name(): string {
    return this.constructor.name;
  }
}

// --- refused: bad input and refusals -------------------------------------------------------------

/** A caller passed an argument of the wrong type or outside its range, or a bad command line. */
export class InvalidArgumentError extends UlobError {
  /**
   * Which mistake, for a caller that words it otherwise (parseSize: 'not-a-size', 'fraction',
   * 'too-large'): test this, never the message. Undefined for most.
   */
  readonly reason: string | undefined;

  constructor(message: string, options: { reason?: string } = {}) {
    super('ULOB_E_INVALID_ARG', message);
    this.reason = options.reason;
  }
}

/** Cache, bitmap or metadata sizes disagree with the backing disk or each other. */
export class SizeMismatchError extends UlobError {
  constructor(message: string) {
    super('ULOB_E_SIZE_MISMATCH', message);
  }
}

/** The cache belongs to another backing disk (identity differs). */
export class ForeignCacheError extends UlobError {
  constructor(message: string) {
    super('ULOB_E_FOREIGN_CACHE', message);
  }
}

/** The cache metadata is unreadable, of an unknown format or inconsistent. */
export class CorruptMetadataError extends UlobError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ULOB_E_CORRUPT_METADATA', message, options);
  }
}

/** The cache is opened by another ulobdev process. */
export class CacheBusyError extends UlobError {
  /** The file found in use (a metadata or cache path, absolute), when known. */
  readonly path: string | undefined;

  constructor(message: string, options: { path?: string } = {}) {
    super('ULOB_E_CACHE_BUSY', message);
    this.path = options.path;
  }
}

/** A device is mounted, held, bound or taken by someone else (or a daemon already serves it). */
export class DeviceBusyError extends UlobError {
  /** Its first use in one phrase ("/dev/loop3 is mounted on /mnt"), when a check listed them. */
  readonly use: string | undefined;

  constructor(message: string, options: { use?: string } = {}) {
    super('ULOB_E_DEVICE_BUSY', message);
    this.use = options.use;
  }
}

/**
 * Another cache holds dirty data of the disk (the disk record names it, docs/format.md "Disk
 * records"): a second cache would show and then flush an older disk.
 */
export class DiskConflictError extends UlobError {
  constructor(message: string) {
    super('ULOB_E_DISK_CONFLICT', message);
  }
}

/** The disk was written through another cache since this cache last saw it: its clean blocks may be stale. */
export class StaleCacheError extends UlobError {
  constructor(message: string) {
    super('ULOB_E_STALE_CACHE', message);
  }
}

/**
 * The disk was written outside ulobdev (mounted directly, a rescue boot) since this cache last
 * saw it, and the cache holds dirty data: flushing it would overwrite the newer data.
 */
export class DiskChangedError extends UlobError {
  constructor(message: string) {
    super('ULOB_E_DISK_CHANGED', message);
  }
}

/** An operation is refused because dirty data would be lost. */
export class DirtyDataError extends UlobError {
  constructor(message: string) {
    super('ULOB_E_DIRTY', message);
  }
}

/** A write, flush or discard reached a read-only cache. */
export class ReadOnlyError extends UlobError {
  constructor(message: string) {
    super('ULOB_E_READ_ONLY', message);
  }
}

/** Binding a kernel device needs root. */
export class NotRootError extends UlobError {
  constructor(message: string) {
    super('ULOB_E_NOT_ROOT', message);
  }
}

/** The kernel refused for want of a privilege (EPERM, EACCES) even though we run as root. */
export class PermissionDeniedError extends UlobError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ULOB_E_PERMISSION', message, options);
  }
}

/** No daemon serves the device or name asked for. */
export class NotAttachedError extends UlobError {
  constructor(message: string) {
    super('ULOB_E_NOT_ATTACHED', message);
  }
}

/** A kernel module a frontend needs (nbd, uloop) is not loaded, or its device is gone. */
export class ModuleMissingError extends UlobError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ULOB_E_NO_MODULE', message, options);
  }
}

/**
 * The kernel refused to load uloop.ko for its signature: an unsigned module, or one signed with a key
 * the kernel does not trust, under Secure Boot or module.sig_enforce (EKEYREJECTED), or lockdown (EPERM).
 */
export class ModuleRejectedError extends UlobError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ULOB_E_MODULE_REJECTED', message, options);
  }
}

/** The loaded uloop module speaks another ABI version than this ulobdev was built for. */
export class ModuleVersionError extends UlobError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ULOB_E_MODULE_VERSION', message, options);
  }
}

/** A helper program (losetup, nbdfuse, nbd-client, fusermount3) is not installed. */
export class MissingProgramError extends UlobError {
  constructor(message: string) {
    super('ULOB_E_MISSING_PROGRAM', message);
  }
}

/** The HTTP server does not serve byte ranges (200 to a Range request, or no size). */
export class NoRangeSupportError extends UlobError {
  constructor(message: string) {
    super('ULOB_E_NO_RANGES', message);
  }
}

/**
 * The image on the server is not the one the cache was made for (ETag, Last-Modified or size
 * changed). On the read path it fails every later read with EIO: two versions are never mixed.
 */
export class ImageChangedError extends UlobError {
  readonly syscall = 'http';

  constructor(message: string) {
    super('ULOB_E_IMAGE_CHANGED', message);
  }
}

/** An NBD peer broke the protocol (bad magic, oversized length, garbage); its connection is closed. */
export class NbdProtocolError extends UlobError {
  constructor(message: string) {
    super('ULOB_E_NBD_PROTOCOL', message);
  }
}

// --- io: I/O failures ----------------------------------------------------------------------------

/** A file or device could not be opened or used; wraps the system error. */
export class IOFailedError extends UlobError {
  readonly syscall: string | undefined;
  readonly path: string | undefined;

  constructor(message: string, options: { cause?: unknown; syscall?: string; path?: string } = {}) {
    super('ULOB_E_IO', message, { cause: options.cause });
    this.syscall = options.syscall;
    this.path = options.path;
  }
}

/** Wraps a thrown system error (NativeError or a node fs error) with a path for context. */
export function ioError(what: string, path: string | undefined, err: unknown): IOFailedError {
  const e = err as { code?: string; syscall?: string; message?: string };
  const code = systemErrorCode(err) ?? e?.code;
  const detail = code
    ? `${code}${e.syscall ? ` (${e.syscall})` : ''}${code === 'ENOSPC' ? ': the filesystem holding it is full' : ''}`
    : String(e?.message ?? err);
  const where = path ? ` ${path}` : '';
  return new IOFailedError(`cannot ${what}${where}: ${detail}`, { cause: err, syscall: e?.syscall, path });
}

/** An HTTP answer the source cannot use (4xx, a bad part), or a request that failed after its retries. */
export class HttpError extends UlobError {
  readonly syscall = 'http';
  readonly status: number | undefined;
  /** Worth another attempt (5xx, 408, 429, a truncated or bad part). */
  readonly retryable: boolean;

  constructor(message: string, options: { status?: number; retryable?: boolean; cause?: unknown } = {}) {
    super('ULOB_E_HTTP', message, { cause: options.cause });
    this.status = options.status;
    this.retryable = options.retryable ?? false;
  }
}

/**
 * A write found no room in the cache: the budget (or the flash filesystem) is full of dirty data
 * and the flush that would make room failed or cannot run. The NBD client sees ENOSPC.
 */
export class CacheFullError extends UlobError {
  /** The code of the class constructed (MetadataFullError names its own). */
  protected static readonly errorCode: string = 'ULOB_E_CACHE_FULL';

  constructor(message: string, options?: { cause?: unknown }) {
    super(new.target.errorCode, message, options);
  }
}

/**
 * The metadata (SQLite) could not be written: the filesystem holding it is full (SQLITE_FULL).
 * The transaction was rolled back (SQLite may roll it back itself on SQLITE_FULL; better-sqlite3's
 * transaction wrapper issues the ROLLBACK when one is still open), so the metadata is as before
 * it and the connection stays usable: the caller may free space and try again. A CacheFullError
 * to a client (an NBD write that gets it sees ENOSPC). `path`: the metadata file.
 */
export class MetadataFullError extends CacheFullError {
  protected static override readonly errorCode: string = 'ULOB_E_METADATA_FULL';
  readonly path: string | undefined;

  constructor(message: string, options: { cause?: unknown; path?: string } = {}) {
    super(message, { cause: options.cause });
    this.path = options.path;
  }
}

/** The engine is closed, or failed earlier (a failed sync) and refuses further I/O. */
export class EngineClosedError extends UlobError {
  constructor(message: string) {
    super('ULOB_E_CLOSED', message);
  }
}

/** The disk refused a power command, or the command could not be delivered. */
export class DiskPowerError extends UlobError {
  constructor(message: string) {
    super('ULOB_E_POWER', message);
  }
}

/** A flush was stopped before its end (the stop deadline): every block it had not cleared stays dirty. */
export class FlushStoppedError extends UlobError {
  constructor(message: string) {
    super('ULOB_E_FLUSH_STOPPED', message);
  }
}

/** A helper program failed; the message carries the last line of its stderr. */
export class CommandFailedError extends UlobError {
  readonly command: string | undefined;
  readonly stderr: string | undefined;

  constructor(message: string, details: { command?: string; stderr?: string } = {}) {
    super('ULOB_E_COMMAND', message);
    this.command = details.command;
    this.stderr = details.stderr;
  }
}

/** nbdfuse did not start, or not in time. */
export class FuseError extends UlobError {
  constructor(message: string) {
    super('ULOB_E_FUSE', message);
  }
}

// --- daemon: no answer ---------------------------------------------------------------------------

/** The daemon exited before it was ready, or closed a request's connection without answering. */
export class DaemonError extends UlobError {
  constructor(message: string) {
    super('ULOB_E_DAEMON', message);
  }
}

/** The daemon did not answer a control request in time. */
export class DaemonTimeoutError extends UlobError {
  constructor(message: string) {
    super('ULOB_E_TIMEOUT', message);
  }
}

/** The daemon's answer was not a control-socket message. */
export class ControlProtocolError extends UlobError {
  constructor(message: string) {
    super('ULOB_E_PROTOCOL', message);
  }
}

// --- internal ------------------------------------------------------------------------------------

/** Something that should not happen did: a bug. */
export class InternalError extends UlobError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ULOB_E_INTERNAL', message, options);
  }
}

/**
 * An error the daemon answered with a code this ulobdev does not know (another version, or a
 * system error it did not wrap): kept as the daemon sent it. Of kind 'io' for an errno name
 * (EIO, ENOSPC), else 'internal'.
 */
export class UnknownDaemonError extends UlobError {
  constructor(code: string, message: string) {
    super(code, message);
  }

  override get kind(): ErrorKind {
    return /^E[A-Z0-9]+$/.test(this.code) ? 'io' : 'internal';
  }
}

// --- the registry --------------------------------------------------------------------------------

/** Every code: its kind, and how to rebuild its error from a control-socket answer. */
export const ERROR_CODES: Readonly<Record<string, { kind: ErrorKind; make: (message: string) => UlobError }>> = {
  ULOB_E_INVALID_ARG: { kind: 'refused', make: (m) => new InvalidArgumentError(m) },
  ULOB_E_SIZE_MISMATCH: { kind: 'refused', make: (m) => new SizeMismatchError(m) },
  ULOB_E_FOREIGN_CACHE: { kind: 'refused', make: (m) => new ForeignCacheError(m) },
  ULOB_E_CORRUPT_METADATA: { kind: 'refused', make: (m) => new CorruptMetadataError(m) },
  ULOB_E_CACHE_BUSY: { kind: 'refused', make: (m) => new CacheBusyError(m) },
  ULOB_E_DEVICE_BUSY: { kind: 'refused', make: (m) => new DeviceBusyError(m) },
  ULOB_E_DIRTY: { kind: 'refused', make: (m) => new DirtyDataError(m) },
  ULOB_E_DISK_CONFLICT: { kind: 'refused', make: (m) => new DiskConflictError(m) },
  ULOB_E_STALE_CACHE: { kind: 'refused', make: (m) => new StaleCacheError(m) },
  ULOB_E_DISK_CHANGED: { kind: 'refused', make: (m) => new DiskChangedError(m) },
  ULOB_E_READ_ONLY: { kind: 'refused', make: (m) => new ReadOnlyError(m) },
  ULOB_E_NOT_ROOT: { kind: 'refused', make: (m) => new NotRootError(m) },
  ULOB_E_PERMISSION: { kind: 'refused', make: (m) => new PermissionDeniedError(m) },
  ULOB_E_NOT_ATTACHED: { kind: 'refused', make: (m) => new NotAttachedError(m) },
  ULOB_E_NO_MODULE: { kind: 'refused', make: (m) => new ModuleMissingError(m) },
  ULOB_E_MODULE_VERSION: { kind: 'refused', make: (m) => new ModuleVersionError(m) },
  ULOB_E_MODULE_REJECTED: { kind: 'refused', make: (m) => new ModuleRejectedError(m) },
  ULOB_E_MISSING_PROGRAM: { kind: 'refused', make: (m) => new MissingProgramError(m) },
  ULOB_E_NO_RANGES: { kind: 'refused', make: (m) => new NoRangeSupportError(m) },
  ULOB_E_IMAGE_CHANGED: { kind: 'refused', make: (m) => new ImageChangedError(m) },
  ULOB_E_NBD_PROTOCOL: { kind: 'refused', make: (m) => new NbdProtocolError(m) },
  ULOB_E_IO: { kind: 'io', make: (m) => new IOFailedError(m) },
  ULOB_E_HTTP: { kind: 'io', make: (m) => new HttpError(m) },
  ULOB_E_CLOSED: { kind: 'io', make: (m) => new EngineClosedError(m) },
  ULOB_E_CACHE_FULL: { kind: 'io', make: (m) => new CacheFullError(m) },
  ULOB_E_METADATA_FULL: { kind: 'io', make: (m) => new MetadataFullError(m) },
  ULOB_E_POWER: { kind: 'io', make: (m) => new DiskPowerError(m) },
  ULOB_E_FLUSH_STOPPED: { kind: 'io', make: (m) => new FlushStoppedError(m) },
  ULOB_E_COMMAND: { kind: 'io', make: (m) => new CommandFailedError(m) },
  ULOB_E_FUSE: { kind: 'io', make: (m) => new FuseError(m) },
  ULOB_E_DAEMON: { kind: 'daemon', make: (m) => new DaemonError(m) },
  ULOB_E_TIMEOUT: { kind: 'daemon', make: (m) => new DaemonTimeoutError(m) },
  ULOB_E_PROTOCOL: { kind: 'daemon', make: (m) => new ControlProtocolError(m) },
  ULOB_E_INTERNAL: { kind: 'internal', make: (m) => new InternalError(m) },
};

/** Rebuilds an error sent as { code, message } (a control-socket answer) as its own class. */
export function errorFromCode(code: string, message: string): UlobError {
  return Object.hasOwn(ERROR_CODES, code) ? ERROR_CODES[code]!.make(message) : new UnknownDaemonError(code, message);
}

/**
 * { code, message } of any thrown value, for a control-socket answer: the error's own code (ours,
 * or a system error's errno name), else ULOB_E_INTERNAL.
 */
export function errorToWire(err: unknown): { code: string; message: string } {
  const e = err as { code?: unknown; message?: unknown };
  return {
    code: typeof e?.code === 'string' ? e.code : 'ULOB_E_INTERNAL',
    message: typeof e?.message === 'string' ? e.message : String(err),
  };
}
