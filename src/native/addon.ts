// The ulob_native addon (native/addon.cc): loading it, the NativeError class its calls throw, and
// the argument validation every wrapper in src/native/ runs first. One TypeScript module per
// native/*.cc: io, blkdev, bitmap, process, power, uloop. Every argument is validated on this
// side, so the C++ side stays mechanism only; its own checks are just a backstop against memory
// corruption.
import { createRequire } from 'node:module';
import { types } from 'node:util';
import { errnoInfo, nameUnknownErrno, systemErrorCode } from '../errno.js';

/** A failed system call inside the addon. */
export class NativeError extends Error {
  /** libuv-style error name: 'EIO', 'ENOSPC', 'EBADF', ... */
  readonly code: string;
  /** Positive errno value. */
  readonly errno: number;
  /** The call that failed: 'pread', 'fallocate', 'ioctl(BLKGETSIZE64)', ... */
  readonly syscall: string;

  // Called from C++ with a Node-style message: `${code}: ${description}, ${syscall}`. An errno
  // libuv has no name for (ESTALE, EUCLEAN, ENOMEDIUM) comes as "Unknown system error -116": named
  // here (src/errno.ts), so the code is the errno's name everywhere it is read.
  constructor(message: string, code: string, errno: number, syscall: string) {
    super(nameUnknownErrno(message));
    this.code = systemErrorCode({ code }) ?? code;
    this.errno = errno;
    this.syscall = syscall;
  }

  override get name(): string {
    return 'NativeError';
  }
}

/**
 * A NativeError for a positive errno, as C++ builds them (`EIO: i/o error, pwrite`): for calls
 * that report several results at once (pwriteList).
 */
export function errnoError(errno: number, syscall: string): NativeError {
  const [code, description] = errnoInfo(errno);
  return new NativeError(`${code}: ${description}, ${syscall}`, code, errno, syscall);
}

interface AddonBinding {
  setErrorClass(ctor: typeof NativeError): void;
}

// Same relative path from src/native/ (vitest runs the TS) and from dist/native/ (compiled).
const binding = createRequire(import.meta.url)('../../build/Release/ulob_native.node') as AddonBinding;
binding.setErrorClass(NativeError);

/** The loaded addon's exports, as the binding interface of one native/*.cc (declared by its module). */
export function addon<T>(): T {
  return binding as unknown as T;
}

// ---------------------------------------------------------------------------------------------
// Validation, in the shape of node's lib/internal/validators.js: TypeError for a wrong type,
// RangeError for a wrong value, each with node's `code`.

const MAX_FD = 0x7fffffff;

type CodedError<E extends Error> = E & { readonly code: string };

function coded<E extends Error>(err: E, code: string): CodedError<E> {
  return Object.assign(err, { code });
}

function received(value: unknown): string {
  if (value === null || value === undefined) return ` Received ${String(value)}`;
  if (typeof value === 'function') return ` Received function ${value.name || '<anonymous>'}`;
  if (typeof value === 'object') {
    const name = (value as object).constructor?.name;
    return name ? ` Received an instance of ${name}` : ' Received an object';
  }
  const shown = typeof value === 'string' ? JSON.stringify(value.length > 28 ? `${value.slice(0, 25)}...` : value) : String(value);
  return ` Received type ${typeof value} (${shown})`;
}

export function invalidArgType(name: string, expected: string, value: unknown): CodedError<TypeError> {
  return coded(new TypeError(`The "${name}" argument must be ${expected}.${received(value)}`), 'ERR_INVALID_ARG_TYPE');
}

export function outOfRange(name: string, range: string, value: unknown): CodedError<RangeError> {
  return coded(
    new RangeError(`The value of "${name}" is out of range. It must be ${range}. Received ${String(value)}`),
    'ERR_OUT_OF_RANGE',
  );
}

export function invalidArgValue(name: string, reason: string, value: unknown): CodedError<TypeError> {
  return coded(new TypeError(`The argument '${name}' ${reason}. Received ${String(value)}`), 'ERR_INVALID_ARG_VALUE');
}

export function validateInteger(value: unknown, name: string, min = 0, max = Number.MAX_SAFE_INTEGER): asserts value is number {
  if (typeof value !== 'number') throw invalidArgType(name, 'of type number', value);
  if (!Number.isInteger(value)) throw outOfRange(name, 'an integer', value);
  if (value < min || value > max) throw outOfRange(name, `>= ${min} && <= ${max}`, value);
}

export function validateFd(fd: unknown): asserts fd is number {
  validateInteger(fd, 'fd', 0, MAX_FD);
}

export function validateBytes(value: unknown, name: string): asserts value is Uint8Array {
  // util.types works across realms, unlike instanceof.
  if (!types.isUint8Array(value)) throw invalidArgType(name, 'an instance of Buffer or Uint8Array', value);
}
