// Every error ulobdev raises on purpose is a UlobError with a stable `code`.
// The message is one line a user can act on; the CLI prints exactly that line.

export class UlobError extends Error {
  readonly code: string;

  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
  }

  override get name(): string {
    return this.constructor.name;
  }
}

/** A caller passed an argument of the wrong type or outside its range. */
export class InvalidArgumentError extends UlobError {
  constructor(message: string) {
    super('ULOB_E_INVALID_ARG', message);
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
  constructor(message: string) {
    super('ULOB_E_CACHE_BUSY', message);
  }
}

/** The backing device is mounted or held by someone else. */
export class DeviceBusyError extends UlobError {
  constructor(message: string) {
    super('ULOB_E_DEVICE_BUSY', message);
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

/** The engine is closed, or failed earlier and refuses further I/O. */
export class EngineClosedError extends UlobError {
  constructor(message: string) {
    super('ULOB_E_CLOSED', message);
  }
}

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
  const detail = e?.code ? `${e.code}${e.syscall ? ` (${e.syscall})` : ''}` : String(e?.message ?? err);
  const where = path ? ` ${path}` : '';
  return new IOFailedError(`cannot ${what}${where}: ${detail}`, { cause: err, syscall: e?.syscall, path });
}

/** An NBD peer broke the protocol (bad magic, oversized length, garbage); its connection is closed. */
export class NbdProtocolError extends UlobError {
  constructor(message: string) {
    super('ULOB_E_NBD_PROTOCOL', message);
  }
}
