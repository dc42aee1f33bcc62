// One place for argument validation; every failure is an InvalidArgumentError.
import { InvalidArgumentError } from './errors.js';

export function assertSafeInteger(value: unknown, name: string, min = 0, max = Number.MAX_SAFE_INTEGER): asserts value is number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value)) {
    throw new InvalidArgumentError(`${name} must be an integer, got ${describe(value)}`);
  }
  if (value < min || value > max) {
    throw new InvalidArgumentError(`${name} must be between ${min} and ${max}, got ${value}`);
  }
}

export function assertBytes(value: unknown, name: string): asserts value is Uint8Array {
  if (!(value instanceof Uint8Array)) {
    throw new InvalidArgumentError(`${name} must be a Buffer or Uint8Array, got ${describe(value)}`);
  }
}

export function assertString(value: unknown, name: string): asserts value is string {
  if (typeof value !== 'string' || value.length === 0) {
    throw new InvalidArgumentError(`${name} must be a non-empty string, got ${describe(value)}`);
  }
}

/** Checks that [offset, offset + length) lies inside a device of `size` bytes. */
export function assertRange(offset: unknown, length: unknown, size: number): asserts offset is number {
  assertSafeInteger(offset, 'offset');
  assertSafeInteger(length, 'length');
  if (offset + length > size) {
    throw new InvalidArgumentError(`range ${offset}+${length} ends beyond the device size ${size}`);
  }
}

export function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

function describe(value: unknown): string {
  if (value === null) return 'null';
  if (typeof value === 'number' || typeof value === 'bigint' || typeof value === 'boolean') return `${typeof value} ${String(value)}`;
  if (typeof value === 'string') return `string ${JSON.stringify(value.length > 40 ? value.slice(0, 40) + '…' : value)}`;
  return typeof value === 'object' ? (value.constructor?.name ?? 'object') : typeof value;
}
