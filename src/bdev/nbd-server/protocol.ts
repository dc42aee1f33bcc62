// The NBD wire format (fixed newstyle handshake, simple and structured replies), as described in
// doc/proto.md of the NetworkBlockDevice project: constants, pure encoders, and decoders that work
// incrementally over a ByteQueue, so no assumption is made about how the stream was chunked.
// Nothing here touches a socket; the server (server.ts, connection.ts, handshake.ts,
// transmission.ts) is the shell around it. The client side of the codec is in client-codec.ts.
import { CacheFullError, InvalidArgumentError, NbdProtocolError, ReadOnlyError } from '../../errors.js';

// --- constants ---------------------------------------------------------------------------------

/** "NBDMAGIC": the first 8 bytes the server sends. */
export const NBD_MAGIC = 0x4e42444d41474943n;
/** "IHAVEOPT": newstyle greeting magic, and the magic of every option the client sends. */
export const IHAVEOPT = 0x49484156454f5054n;
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;
export const DEFAULT_PORT = 10809;

export const GREETING_SIZE = 18;
export const OPTION_HEADER_SIZE = 16;
export const OPTION_REPLY_HEADER_SIZE = 20;
export const REQUEST_HEADER_SIZE = 28;
export const SIMPLE_REPLY_SIZE = 16;
export const CHUNK_HEADER_SIZE = 20;
/** Strings (export names, messages, context names) are at most this long on the wire. */
export const MAX_STRING = 4096;

/** Handshake flags (server, 16 bits). */
export const HandshakeFlag = { FIXED_NEWSTYLE: 1 << 0, NO_ZEROES: 1 << 1 } as const;
/** Client flags (32 bits); any other bit set means the connection must be dropped. */
export const ClientFlag = { FIXED_NEWSTYLE: 1 << 0, NO_ZEROES: 1 << 1 } as const;

export const Opt = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

const REP_ERR = 0x80000000;
export const Rep = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: REP_ERR + 1,
  ERR_POLICY: REP_ERR + 2,
  ERR_INVALID: REP_ERR + 3,
  ERR_PLATFORM: REP_ERR + 4,
  ERR_TLS_REQD: REP_ERR + 5,
  ERR_UNKNOWN: REP_ERR + 6,
  ERR_SHUTDOWN: REP_ERR + 7,
  ERR_BLOCK_SIZE_REQD: REP_ERR + 8,
  ERR_TOO_BIG: REP_ERR + 9,
} as const;

export const Info = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

/** Transmission flags (16 bits), sent with the export size. */
export const TxFlag = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
} as const;

export const Cmd = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
  RESIZE: 8,
} as const;

export const CmdFlag = {
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
} as const;

export const ReplyFlag = { DONE: 1 << 0 } as const;

export const ReplyType = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: (1 << 15) + 1,
  ERROR_OFFSET: (1 << 15) + 2,
} as const;

/** The error values NBD allows on the wire (Linux errno numbers). */
export const Errno = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

export const BASE_ALLOCATION = 'base:allocation';

const optNames = invert(Opt);
const cmdNames = invert(Cmd);
const errnoNames = invert(Errno);

export function optionName(option: number): string {
  return optNames.get(option) ? `NBD_OPT_${optNames.get(option)}` : `option ${option}`;
}

export function commandName(type: number): string {
  return cmdNames.get(type) ? `NBD_CMD_${cmdNames.get(type)}` : `command ${type}`;
}

export function errnoName(errno: number): string {
  return errnoNames.get(errno) ?? `errno ${errno}`;
}

// --- byte queue --------------------------------------------------------------------------------

/**
 * Bytes received and not yet decoded. Decoders look at the front without consuming until a whole
 * message is there, so a message split across any number of chunks decodes the same.
 */
export class ByteQueue {
  #chunks: Buffer[] = [];
  /** Bytes of #chunks[0] already consumed. */
  #head = 0;
  #length = 0;

  get length(): number {
    return this.#length;
  }

  push(chunk: Uint8Array): void {
    if (chunk.byteLength === 0) return;
    this.#chunks.push(Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength));
    this.#length += chunk.byteLength;
  }

  /** The first `n` bytes (n <= length) as one buffer, without consuming them. */
  peek(n: number): Buffer {
    if (n > this.#length) throw new RangeError(`peek(${n}) with only ${this.#length} bytes queued`);
    if (n === 0) return Buffer.alloc(0);
    const first = this.#chunks[0]!;
    if (first.byteLength - this.#head >= n) return first.subarray(this.#head, this.#head + n);
    // Merge just enough chunks that the front is contiguous; later peeks of it are then free.
    const parts: Buffer[] = [];
    let have = 0;
    let k = 0;
    while (have < n) {
      const c = k === 0 ? first.subarray(this.#head) : this.#chunks[k]!;
      parts.push(c);
      have += c.byteLength;
      k++;
    }
    const merged = Buffer.concat(parts, have);
    this.#chunks.splice(0, k, merged);
    this.#head = 0;
    return merged.subarray(0, n);
  }

  /** True when the first `n` bytes lie in one received chunk (take(n) then copies nothing). */
  contiguous(n: number): boolean {
    const first = this.#chunks[0];
    return n === 0 || (first !== undefined && first.byteLength - this.#head >= n);
  }

  /** Consumes the first target.byteLength bytes into `target` and returns it; nothing is merged. */
  takeInto(target: Buffer): Buffer {
    let n = target.byteLength;
    if (n > this.#length) throw new RangeError(`takeInto(${n}) with only ${this.#length} bytes queued`);
    let at = 0;
    while (n > 0) {
      const first = this.#chunks[0]!;
      const k = Math.min(n, first.byteLength - this.#head);
      first.copy(target, at, this.#head, this.#head + k);
      at += k;
      n -= k;
      this.skip(k);
    }
    return target;
  }

  /**
   * Copies every queued byte into memory of the queue's own (one buffer). For chunks pushed as
   * views of memory their owner reuses (a socket's read buffer): call it before that memory is
   * overwritten.
   */
  own(): void {
    if (this.#length === 0) {
      this.#chunks = [];
      this.#head = 0;
      return;
    }
    const copy = Buffer.allocUnsafe(this.#length);
    let at = 0;
    for (let k = 0; k < this.#chunks.length; k++) {
      const c = this.#chunks[k]!;
      at += c.copy(copy, at, k === 0 ? this.#head : 0);
    }
    this.#chunks = [copy];
    this.#head = 0;
  }

  /** Consumes and returns the first `n` bytes. */
  take(n: number): Buffer {
    const out = this.peek(n);
    this.skip(n);
    return out;
  }

  skip(n: number): void {
    if (n > this.#length) throw new RangeError(`skip(${n}) with only ${this.#length} bytes queued`);
    this.#length -= n;
    while (n > 0) {
      const first = this.#chunks[0]!;
      const avail = first.byteLength - this.#head;
      if (n < avail) {
        this.#head += n;
        return;
      }
      n -= avail;
      this.#chunks.shift();
      this.#head = 0;
    }
  }

  clear(): void {
    this.#chunks = [];
    this.#head = 0;
    this.#length = 0;
  }
}

// --- handshake: server side --------------------------------------------------------------------

export function encodeGreeting(handshakeFlags: number): Buffer {
  const b = Buffer.alloc(GREETING_SIZE);
  b.writeBigUInt64BE(NBD_MAGIC, 0);
  b.writeBigUInt64BE(IHAVEOPT, 8);
  b.writeUInt16BE(handshakeFlags, 16);
  return b;
}

/** The client's 32-bit flags, or null if they have not all arrived. */
export function decodeClientFlags(q: ByteQueue): number | null {
  if (q.length < 4) return null;
  return q.take(4).readUInt32BE(0);
}

export interface NbdOption {
  option: number;
  data: Buffer;
}

/**
 * One option (header and data), or null until all of it has arrived. A bad magic or a length over
 * `maxDataLength` throws as soon as the header is there, before any of the data is buffered.
 */
export function decodeOption(q: ByteQueue, maxDataLength: number): NbdOption | null {
  if (q.length < OPTION_HEADER_SIZE) return null;
  const h = q.peek(OPTION_HEADER_SIZE);
  const magic = h.readBigUInt64BE(0);
  if (magic !== IHAVEOPT) throw new NbdProtocolError(`bad option magic 0x${magic.toString(16)}`);
  const option = h.readUInt32BE(8);
  const length = h.readUInt32BE(12);
  if (length > maxDataLength) {
    throw new NbdProtocolError(`${optionName(option)} carries ${length} bytes of data, more than the ${maxDataLength} allowed`);
  }
  if (q.length < OPTION_HEADER_SIZE + length) return null;
  q.skip(OPTION_HEADER_SIZE);
  return { option, data: q.take(length) };
}

/** The reply to NBD_OPT_EXPORT_NAME: size, transmission flags, and 124 zeroes unless NO_ZEROES. */
export function encodeExportNameReply(size: number, transmissionFlags: number, zeroes: boolean): Buffer {
  const b = Buffer.alloc(10 + (zeroes ? 124 : 0));
  b.writeBigUInt64BE(BigInt(size), 0);
  b.writeUInt16BE(transmissionFlags, 8);
  return b;
}

export function encodeOptionReply(option: number, type: number, data: Uint8Array = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(OPTION_REPLY_HEADER_SIZE + data.byteLength);
  b.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(type, 12);
  b.writeUInt32BE(data.byteLength, 16);
  b.set(data, OPTION_REPLY_HEADER_SIZE);
  return b;
}

/** An error reply with a message for a human; the message is cut to MAX_STRING bytes. */
export function encodeOptionError(option: number, type: number, message: string): Buffer {
  return encodeOptionReply(option, type, utf8(message, MAX_STRING));
}

/** NBD_REP_SERVER data: the export name, then a description for humans. */
export function encodeServerData(name: string, description = ''): Buffer {
  const n = utf8(name, MAX_STRING);
  const d = utf8(description, MAX_STRING);
  const b = Buffer.alloc(4 + n.byteLength + d.byteLength);
  b.writeUInt32BE(n.byteLength, 0);
  n.copy(b, 4);
  d.copy(b, 4 + n.byteLength);
  return b;
}

/** NBD_REP_INFO data for NBD_INFO_EXPORT. */
export function encodeInfoExport(size: number, transmissionFlags: number): Buffer {
  const b = Buffer.alloc(12);
  b.writeUInt16BE(Info.EXPORT, 0);
  b.writeBigUInt64BE(BigInt(size), 2);
  b.writeUInt16BE(transmissionFlags, 10);
  return b;
}

/** NBD_REP_INFO data for NBD_INFO_NAME or NBD_INFO_DESCRIPTION. */
export function encodeInfoString(type: typeof Info.NAME | typeof Info.DESCRIPTION, text: string): Buffer {
  const s = utf8(text, MAX_STRING);
  const b = Buffer.alloc(2 + s.byteLength);
  b.writeUInt16BE(type, 0);
  s.copy(b, 2);
  return b;
}

/** NBD_REP_INFO data for NBD_INFO_BLOCK_SIZE. */
export function encodeInfoBlockSize(minimum: number, preferred: number, maximum: number): Buffer {
  const b = Buffer.alloc(14);
  b.writeUInt16BE(Info.BLOCK_SIZE, 0);
  b.writeUInt32BE(minimum, 2);
  b.writeUInt32BE(preferred, 6);
  b.writeUInt32BE(maximum, 10);
  return b;
}

/** NBD_REP_META_CONTEXT data. */
export function encodeMetaContext(id: number, name: string): Buffer {
  const s = utf8(name, MAX_STRING);
  const b = Buffer.alloc(4 + s.byteLength);
  b.writeUInt32BE(id, 0);
  s.copy(b, 4);
  return b;
}

export interface InfoRequest {
  name: string;
  /** NBD_INFO_* types the client asked for. */
  requests: number[];
}

/** Data of NBD_OPT_INFO / NBD_OPT_GO, or undefined if its lengths do not add up. */
export function parseInfoRequest(data: Buffer): InfoRequest | undefined {
  if (data.byteLength < 6) return undefined;
  const nameLength = data.readUInt32BE(0);
  if (nameLength > MAX_STRING || data.byteLength < 4 + nameLength + 2) return undefined;
  const name = data.toString('utf8', 4, 4 + nameLength);
  const count = data.readUInt16BE(4 + nameLength);
  const start = 4 + nameLength + 2;
  if (data.byteLength !== start + 2 * count) return undefined;
  const requests: number[] = [];
  for (let i = 0; i < count; i++) requests.push(data.readUInt16BE(start + 2 * i));
  return { name, requests };
}

export interface MetaContextRequest {
  name: string;
  queries: string[];
}

/** Data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT, or undefined if malformed. */
export function parseMetaContextRequest(data: Buffer): MetaContextRequest | undefined {
  if (data.byteLength < 8) return undefined;
  const nameLength = data.readUInt32BE(0);
  if (nameLength > MAX_STRING || data.byteLength < 4 + nameLength + 4) return undefined;
  const name = data.toString('utf8', 4, 4 + nameLength);
  const count = data.readUInt32BE(4 + nameLength);
  let pos = 4 + nameLength + 4;
  // Each query needs at least its 4-byte length: rejects absurd counts before looping.
  if (count > (data.byteLength - pos) / 4) return undefined;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (pos + 4 > data.byteLength) return undefined;
    const len = data.readUInt32BE(pos);
    pos += 4;
    if (len > MAX_STRING || pos + len > data.byteLength) return undefined;
    queries.push(data.toString('utf8', pos, pos + len));
    pos += len;
  }
  if (pos !== data.byteLength) return undefined;
  return { name, queries };
}

// --- transmission: server side -----------------------------------------------------------------

export interface NbdRequest {
  flags: number;
  type: number;
  /** Opaque to the server; echoed in every reply. */
  handle: bigint;
  /** Unsigned 64-bit; may be beyond any export, so kept exact until checked. */
  offset: bigint;
  length: number;
  /** The payload of NBD_CMD_WRITE. */
  data?: Buffer;
  /** `data` came from the decoder's allocator (decodeRequest, decodeRequestStart): hand it back once the write is done. */
  pooled?: boolean;
}

/**
 * The header of the next request, still queued (the caller skips it), or null until all of it has
 * arrived. Throws NbdProtocolError for a bad magic, or a write payload over `maxWrite` (it has to
 * be read to stay in step with the stream; one too big to buffer ends it).
 */
function peekRequestHeader(q: ByteQueue, maxWrite: number): NbdRequest | null {
  if (q.length < REQUEST_HEADER_SIZE) return null;
  const h = q.peek(REQUEST_HEADER_SIZE);
  const magic = h.readUInt32BE(0);
  if (magic !== REQUEST_MAGIC) throw new NbdProtocolError(`bad request magic 0x${magic.toString(16)}`);
  const req: NbdRequest = {
    flags: h.readUInt16BE(4),
    type: h.readUInt16BE(6),
    handle: h.readBigUInt64BE(8),
    offset: h.readBigUInt64BE(16),
    length: h.readUInt32BE(24),
  };
  if (req.type === Cmd.WRITE && req.length > maxWrite) {
    throw new NbdProtocolError(`NBD_CMD_WRITE of ${req.length} bytes exceeds the maximum payload of ${maxWrite}`);
  }
  return req;
}

/**
 * One request (with its payload for NBD_CMD_WRITE), or null until all of it has arrived. A bad
 * magic, or a write payload over `maxWrite`, throws as soon as the header is there.
 */
export function decodeRequest(q: ByteQueue, maxWrite: number, allocPayload?: (length: number) => Buffer): NbdRequest | null {
  const req = peekRequestHeader(q, maxWrite);
  if (!req) return null;
  if (req.type === Cmd.WRITE) {
    if (q.length < REQUEST_HEADER_SIZE + req.length) return null;
    q.skip(REQUEST_HEADER_SIZE);
    // A payload in one received chunk is a view of it; one spread over several is copied, into
    // memory from `allocPayload` when given (reused: a large fresh buffer per write costs page
    // faults and garbage collection), else into a new buffer.
    if (allocPayload && !q.contiguous(req.length)) {
      req.data = q.takeInto(allocPayload(req.length));
      req.pooled = true;
    } else {
      req.data = q.take(req.length);
    }
    return req;
  }
  q.skip(REQUEST_HEADER_SIZE);
  return req;
}

/** A request whose header is decoded; for NBD_CMD_WRITE, `have` bytes of its payload are in req.data. */
export interface RequestStart {
  req: NbdRequest;
  /** Payload bytes already in req.data (from its start): req.length when complete; 0 for commands without a payload. */
  have: number;
}

/**
 * One request, as soon as its header is queued: unlike decodeRequest it does not wait for a
 * write's payload. The payload goes into memory from `allocPayload` (req.pooled), with as much of
 * it as is queued copied in; the caller reads the rest straight into req.data.subarray(have), so
 * a payload is copied at most once however it arrives. Null until a whole header is queued.
 * Throws NbdProtocolError for a bad magic or a write payload over `maxWrite`.
 */
export function decodeRequestStart(q: ByteQueue, maxWrite: number, allocPayload: (length: number) => Buffer): RequestStart | null {
  const req = peekRequestHeader(q, maxWrite);
  if (!req) return null;
  q.skip(REQUEST_HEADER_SIZE);
  if (req.type !== Cmd.WRITE) return { req, have: 0 };
  const data = allocPayload(req.length);
  const have = Math.min(q.length, req.length);
  if (have > 0) q.takeInto(data.subarray(0, have));
  req.data = data;
  req.pooled = true;
  return { req, have };
}

export function encodeSimpleReply(error: number, handle: bigint): Buffer {
  const b = Buffer.alloc(SIMPLE_REPLY_SIZE);
  writeSimpleReply(b, error, handle);
  return b;
}

/** A simple reply header into the first SIMPLE_REPLY_SIZE bytes of `b`. */
export function writeSimpleReply(b: Buffer, error: number, handle: bigint): void {
  b.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  b.writeBigUInt64BE(handle, 8);
}

export function encodeChunkHeader(flags: number, type: number, handle: bigint, length: number): Buffer {
  const b = Buffer.alloc(CHUNK_HEADER_SIZE);
  writeChunkHeader(b, flags, type, handle, length);
  return b;
}

/** Chunk header plus offset of an NBD_REPLY_TYPE_OFFSET_DATA chunk; `dataLength` bytes follow it. */
export function encodeOffsetDataHeader(flags: number, handle: bigint, offset: number, dataLength: number): Buffer {
  const b = Buffer.alloc(OFFSET_DATA_HEADER_SIZE);
  writeOffsetDataHeader(b, flags, handle, offset, dataLength);
  return b;
}

/** Bytes of an NBD_REPLY_TYPE_OFFSET_DATA chunk before its data: chunk header and offset. */
export const OFFSET_DATA_HEADER_SIZE = CHUNK_HEADER_SIZE + 8;

/** encodeOffsetDataHeader into the first OFFSET_DATA_HEADER_SIZE bytes of `b`. */
export function writeOffsetDataHeader(b: Buffer, flags: number, handle: bigint, offset: number, dataLength: number): void {
  writeChunkHeader(b, flags, ReplyType.OFFSET_DATA, handle, 8 + dataLength);
  // The offset as two 32-bit halves: no BigInt per reply (offsets are below 2^53).
  b.writeUInt32BE(Math.floor(offset / 2 ** 32), CHUNK_HEADER_SIZE);
  b.writeUInt32BE(offset >>> 0, CHUNK_HEADER_SIZE + 4);
}

export function encodeNoneChunk(handle: bigint): Buffer {
  return encodeChunkHeader(ReplyFlag.DONE, ReplyType.NONE, handle, 0);
}

/** An NBD_REPLY_TYPE_ERROR chunk, marked done; the message is cut to MAX_STRING bytes. */
export function encodeErrorChunk(handle: bigint, errno: number, message: string): Buffer {
  const m = utf8(message, MAX_STRING);
  const b = Buffer.alloc(CHUNK_HEADER_SIZE + 6 + m.byteLength);
  writeChunkHeader(b, ReplyFlag.DONE, ReplyType.ERROR, handle, 6 + m.byteLength);
  b.writeUInt32BE(errno, CHUNK_HEADER_SIZE);
  b.writeUInt16BE(m.byteLength, CHUNK_HEADER_SIZE + 4);
  m.copy(b, CHUNK_HEADER_SIZE + 6);
  return b;
}

export interface BlockStatusExtent {
  length: number;
  flags: number;
}

/** An NBD_REPLY_TYPE_BLOCK_STATUS chunk for one metadata context. */
export function encodeBlockStatusChunk(flags: number, handle: bigint, contextId: number, extents: readonly BlockStatusExtent[]): Buffer {
  const b = Buffer.alloc(CHUNK_HEADER_SIZE + 4 + 8 * extents.length);
  writeChunkHeader(b, flags, ReplyType.BLOCK_STATUS, handle, 4 + 8 * extents.length);
  b.writeUInt32BE(contextId, CHUNK_HEADER_SIZE);
  extents.forEach((e, i) => {
    b.writeUInt32BE(e.length, CHUNK_HEADER_SIZE + 4 + 8 * i);
    b.writeUInt32BE(e.flags, CHUNK_HEADER_SIZE + 8 + 8 * i);
  });
  return b;
}

// --- request checks ----------------------------------------------------------------------------

/** What the server negotiated with one client; the input of checkRequest(). */
export interface TransmissionState {
  size: number;
  transmissionFlags: number;
  /** A metadata context (base:allocation) was selected, so BLOCK_STATUS is allowed. */
  metaContext: boolean;
  /** Largest READ the server answers. */
  maxPayload: number;
}

export interface RequestRejection {
  errno: number;
  message: string;
}

/**
 * Why a request must be answered with an error instead of executed, or null if it is valid.
 * Unknown commands and flags give EINVAL, writes to a read-only export EPERM, ranges beyond the
 * export EINVAL (ENOSPC for writes, as the protocol recommends).
 */
export function checkRequest(req: NbdRequest, state: TransmissionState): RequestRejection | null {
  const tf = state.transmissionFlags;
  const name = commandName(req.type);
  let allowed: number;
  switch (req.type) {
    case Cmd.READ:
      allowed = tf & TxFlag.SEND_DF ? CmdFlag.DF : 0;
      break;
    case Cmd.WRITE:
    case Cmd.FLUSH:
    case Cmd.CACHE:
      allowed = 0;
      break;
    case Cmd.TRIM:
      if (!(tf & TxFlag.SEND_TRIM) && !(tf & TxFlag.READ_ONLY)) return reject(Errno.EINVAL, `${name} is not supported`);
      allowed = 0;
      break;
    case Cmd.WRITE_ZEROES:
      if (!(tf & TxFlag.SEND_WRITE_ZEROES) && !(tf & TxFlag.READ_ONLY)) return reject(Errno.EINVAL, `${name} is not supported`);
      allowed = CmdFlag.NO_HOLE;
      break;
    case Cmd.BLOCK_STATUS:
      allowed = CmdFlag.REQ_ONE;
      break;
    default:
      return reject(Errno.EINVAL, `unknown ${name}`);
  }
  const writes = req.type === Cmd.WRITE || req.type === Cmd.TRIM || req.type === Cmd.WRITE_ZEROES;
  if (writes && tf & TxFlag.READ_ONLY) return reject(Errno.EPERM, `${name} on a read-only export`);
  if (tf & TxFlag.SEND_FUA) allowed |= CmdFlag.FUA;
  const extra = req.flags & ~allowed;
  if (extra !== 0) return reject(Errno.EINVAL, `${name} does not take flags 0x${extra.toString(16)}`);
  if (req.type === Cmd.FLUSH) return null; // offset and length are reserved
  if (req.type === Cmd.BLOCK_STATUS) {
    if (!state.metaContext) return reject(Errno.EINVAL, `${name} without a negotiated metadata context`);
    if (req.length === 0) return reject(Errno.EINVAL, `${name} of length 0`);
  }
  if (req.offset + BigInt(req.length) > BigInt(state.size)) {
    const errno = req.type === Cmd.WRITE || req.type === Cmd.WRITE_ZEROES ? Errno.ENOSPC : Errno.EINVAL;
    return reject(errno, `${name} of ${req.length} bytes at ${req.offset} ends beyond the export size ${state.size}`);
  }
  if (req.type === Cmd.READ && req.length > state.maxPayload) {
    return reject(Errno.EINVAL, `${name} of ${req.length} bytes exceeds the maximum payload of ${state.maxPayload}`);
  }
  return null;
}

/** The NBD error value for an error thrown by a backend. */
export function errnoOf(err: unknown): number {
  if (err instanceof ReadOnlyError) return Errno.EPERM;
  if (err instanceof InvalidArgumentError) return Errno.EINVAL;
  if (err instanceof CacheFullError) return Errno.ENOSPC;
  let e: unknown = err;
  for (let depth = 0; e && typeof e === 'object' && depth < 8; depth++) {
    switch ((e as { code?: unknown }).code) {
      case 'EPERM':
      case 'EACCES':
      case 'EROFS':
        return Errno.EPERM;
      case 'ENOSPC':
      case 'EDQUOT':
      case 'EFBIG':
        return Errno.ENOSPC;
      case 'EINVAL':
        return Errno.EINVAL;
      case 'ENOMEM':
        return Errno.ENOMEM;
      case 'EOVERFLOW':
        return Errno.EOVERFLOW;
      case 'ENOTSUP':
      case 'EOPNOTSUPP':
        return Errno.ENOTSUP;
      case 'ESHUTDOWN':
        return Errno.ESHUTDOWN;
    }
    e = (e as { cause?: unknown }).cause;
  }
  return Errno.EIO;
}

// --- helpers -----------------------------------------------------------------------------------

function writeChunkHeader(b: Buffer, flags: number, type: number, handle: bigint, length: number): void {
  b.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(handle, 8);
  b.writeUInt32BE(length, 16);
}

function reject(errno: number, message: string): RequestRejection {
  return { errno, message };
}

/** UTF-8 bytes of `text`, cut at a character boundary to at most `max` bytes. */
function utf8(text: string, max: number): Buffer {
  const b = Buffer.from(text, 'utf8');
  if (b.byteLength <= max) return b;
  let end = max;
  while (end > 0 && (b[end]! & 0xc0) === 0x80) end--;
  return b.subarray(0, end);
}

function invert(table: Record<string, number>): Map<number, string> {
  return new Map(Object.entries(table).map(([k, v]) => [v, k]));
}
