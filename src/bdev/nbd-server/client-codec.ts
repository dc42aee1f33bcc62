// The client side of the NBD codec (doc/proto.md of the NetworkBlockDevice project): what a client
// sends and how it reads the server's answers. The server never uses it; the tests' raw clients
// and tools do, so the server's codec in protocol.ts is checked against an independent peer.
import { NbdProtocolError } from '../../errors.js';
import {
  ByteQueue,
  CHUNK_HEADER_SIZE,
  GREETING_SIZE,
  IHAVEOPT,
  NBD_MAGIC,
  OPTION_HEADER_SIZE,
  OPTION_REPLY_HEADER_SIZE,
  OPTION_REPLY_MAGIC,
  REQUEST_HEADER_SIZE,
  REQUEST_MAGIC,
  SIMPLE_REPLY_MAGIC,
  SIMPLE_REPLY_SIZE,
  STRUCTURED_REPLY_MAGIC,
  type NbdRequest,
} from './protocol.js';

export function encodeOption(option: number, data: Uint8Array = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(OPTION_HEADER_SIZE + data.byteLength);
  b.writeBigUInt64BE(IHAVEOPT, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(data.byteLength, 12);
  b.set(data, OPTION_HEADER_SIZE);
  return b;
}

export function encodeInfoRequest(name: string, requests: readonly number[]): Buffer {
  const n = Buffer.from(name, 'utf8');
  const b = Buffer.alloc(4 + n.byteLength + 2 + 2 * requests.length);
  b.writeUInt32BE(n.byteLength, 0);
  n.copy(b, 4);
  b.writeUInt16BE(requests.length, 4 + n.byteLength);
  requests.forEach((r, i) => b.writeUInt16BE(r, 4 + n.byteLength + 2 + 2 * i));
  return b;
}

export function encodeMetaContextRequest(name: string, queries: readonly string[]): Buffer {
  const parts = [u32(Buffer.byteLength(name)), Buffer.from(name, 'utf8'), u32(queries.length)];
  for (const q of queries) parts.push(u32(Buffer.byteLength(q)), Buffer.from(q, 'utf8'));
  return Buffer.concat(parts);
}

/** A request header, followed by `data` for NBD_CMD_WRITE. */
export function encodeRequest(req: NbdRequest): Buffer {
  const data = req.data ?? Buffer.alloc(0);
  const b = Buffer.alloc(REQUEST_HEADER_SIZE + data.byteLength);
  b.writeUInt32BE(REQUEST_MAGIC, 0);
  b.writeUInt16BE(req.flags, 4);
  b.writeUInt16BE(req.type, 6);
  b.writeBigUInt64BE(req.handle, 8);
  b.writeBigUInt64BE(req.offset, 16);
  b.writeUInt32BE(req.length, 24);
  data.copy(b, REQUEST_HEADER_SIZE);
  return b;
}

export interface Greeting {
  handshakeFlags: number;
}

export function decodeGreeting(q: ByteQueue): Greeting | null {
  if (q.length < GREETING_SIZE) return null;
  const b = q.take(GREETING_SIZE);
  if (b.readBigUInt64BE(0) !== NBD_MAGIC || b.readBigUInt64BE(8) !== IHAVEOPT) throw new NbdProtocolError('not a newstyle NBD server');
  return { handshakeFlags: b.readUInt16BE(16) };
}

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

export function decodeOptionReply(q: ByteQueue): OptionReply | null {
  if (q.length < OPTION_REPLY_HEADER_SIZE) return null;
  const h = q.peek(OPTION_REPLY_HEADER_SIZE);
  if (h.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) throw new NbdProtocolError('bad option reply magic');
  const length = h.readUInt32BE(16);
  if (q.length < OPTION_REPLY_HEADER_SIZE + length) return null;
  q.skip(OPTION_REPLY_HEADER_SIZE);
  return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: q.take(length) };
}

export type Reply =
  | { kind: 'simple'; error: number; handle: bigint }
  | { kind: 'chunk'; flags: number; type: number; handle: bigint; payload: Buffer };

/**
 * A simple reply header (its read data, if any, follows and is the caller's to take: only the
 * caller knows the request's length), or a whole structured reply chunk.
 */
export function decodeReply(q: ByteQueue): Reply | null {
  if (q.length < 4) return null;
  const magic = q.peek(4).readUInt32BE(0);
  if (magic === SIMPLE_REPLY_MAGIC) {
    if (q.length < SIMPLE_REPLY_SIZE) return null;
    const b = q.take(SIMPLE_REPLY_SIZE);
    return { kind: 'simple', error: b.readUInt32BE(4), handle: b.readBigUInt64BE(8) };
  }
  if (magic === STRUCTURED_REPLY_MAGIC) {
    if (q.length < CHUNK_HEADER_SIZE) return null;
    const h = q.peek(CHUNK_HEADER_SIZE);
    const length = h.readUInt32BE(16);
    if (q.length < CHUNK_HEADER_SIZE + length) return null;
    q.skip(CHUNK_HEADER_SIZE);
    return { kind: 'chunk', flags: h.readUInt16BE(4), type: h.readUInt16BE(6), handle: h.readBigUInt64BE(8), payload: q.take(length) };
  }
  throw new NbdProtocolError(`bad reply magic 0x${magic.toString(16)}`);
}

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n, 0);
  return b;
}
