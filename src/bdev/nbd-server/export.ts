// What an NBD server serves: one BlockBackend under a name, and the limits it advertises and
// enforces per connection. Validated once, when the server is made.
import type { Logger } from 'pino';
import { InvalidArgumentError } from '../../errors.js';
import { assertSafeInteger, isPowerOfTwo } from '../../validate.js';
import type { BlockBackend } from '../backend.js';
import { IoBuffers } from './buffers.js';

export interface NbdServerOptions {
  backend: BlockBackend;
  /** The export's name; the default export '' and 'ulobdev' reach it too. Default ''. */
  exportName?: string;
  /** Shown to clients that list exports or ask for NBD_INFO_DESCRIPTION. */
  description?: string;
  logger?: Logger;
  /** Largest READ or WRITE payload, advertised as the maximum block size. Default 32 MiB. */
  maxPayload?: number;
  /** Advertised minimum block size (a power of two up to 64 KiB). Default 512. */
  minBlockSize?: number;
  /** Advertised preferred block size. Default 4096. */
  preferredBlockSize?: number;
  /** Requests one connection may have in flight before its socket is paused. Default 128. */
  maxInflightRequests?: number;
  /** Payload and unsent reply bytes one connection may hold before its socket is paused. Default 64 MiB. */
  maxInflightBytes?: number;
}

/** NbdServerOptions with every default filled in and checked. */
export interface ExportConfig {
  backend: BlockBackend;
  exportName: string;
  /** Every name a client may ask for: exportName, '' (the default export) and 'ulobdev'. */
  names: ReadonlySet<string>;
  description: string;
  maxPayload: number;
  minBlockSize: number;
  preferredBlockSize: number;
  maxInflightRequests: number;
  maxInflightBytes: number;
  /** Reply and payload memory, shared by the server's connections. */
  buffers: IoBuffers;
}

const MiB = 1 << 20;
const DEFAULT_MAX_PAYLOAD = 32 * MiB;

/** Checks the options and fills in the defaults; InvalidArgumentError names the first bad one. */
export function exportConfig(options: NbdServerOptions): ExportConfig {
  const b = options?.backend;
  if (!b || typeof b.read !== 'function' || typeof b.write !== 'function' || typeof b.flush !== 'function' || typeof b.discard !== 'function') {
    throw new InvalidArgumentError('backend must implement read, write, flush and discard');
  }
  assertSafeInteger(b.size, 'backend size', 0);
  const exportName = options.exportName ?? '';
  if (typeof exportName !== 'string' || Buffer.byteLength(exportName) > 4096) {
    throw new InvalidArgumentError('exportName must be a string of at most 4096 bytes');
  }
  const maxPayload = options.maxPayload ?? DEFAULT_MAX_PAYLOAD;
  assertSafeInteger(maxPayload, 'maxPayload', 4096, 2 ** 31);
  const minBlockSize = options.minBlockSize ?? 512;
  assertSafeInteger(minBlockSize, 'minBlockSize', 1, 65536);
  const preferredBlockSize = options.preferredBlockSize ?? 4096;
  assertSafeInteger(preferredBlockSize, 'preferredBlockSize', Math.max(512, minBlockSize), maxPayload);
  if (!isPowerOfTwo(minBlockSize) || !isPowerOfTwo(preferredBlockSize)) {
    throw new InvalidArgumentError('minBlockSize and preferredBlockSize must be powers of two');
  }
  const maxInflightRequests = options.maxInflightRequests ?? 128;
  assertSafeInteger(maxInflightRequests, 'maxInflightRequests', 1, 65536);
  const maxInflightBytes = options.maxInflightBytes ?? 64 * MiB;
  assertSafeInteger(maxInflightBytes, 'maxInflightBytes', 1);
  return {
    backend: b,
    exportName,
    names: new Set([exportName, '', 'ulobdev']),
    description: options.description ?? '',
    maxPayload,
    minBlockSize,
    preferredBlockSize,
    maxInflightRequests,
    maxInflightBytes,
    buffers: new IoBuffers(),
  };
}
