// The transmission phase of one connection (doc/proto.md, "Transmission"): each request checked
// against what the handshake negotiated, run on the backend, and answered with a simple reply or
// structured chunks. Requests run concurrently and are answered as they finish, in any order; the
// connection (connection.ts) decides how many may be in flight.
import type * as net from 'node:net';
import type { Logger } from 'pino';
import { BASE_ALLOCATION_ID, type Negotiated } from './handshake.js';
import type { ExportConfig } from './export.js';
import {
  ByteQueue,
  Cmd,
  CmdFlag,
  Errno,
  ReplyFlag,
  checkRequest,
  commandName,
  decodeRequest,
  encodeBlockStatusChunk,
  encodeErrorChunk,
  encodeNoneChunk,
  encodeOffsetDataHeader,
  encodeSimpleReply,
  errnoName,
  errnoOf,
  type NbdRequest,
} from './protocol.js';

const MiB = 1 << 20;
/** WRITE_ZEROES and CACHE work through their range in pieces this large. */
const WORK_CHUNK = 4 * MiB;
const ZEROES = Buffer.alloc(WORK_CHUNK);

export class Transmission {
  readonly #socket: net.Socket;
  readonly #config: ExportConfig;
  readonly #negotiated: Negotiated;
  readonly #log: Logger;

  constructor(socket: net.Socket, config: ExportConfig, negotiated: Negotiated, log: Logger) {
    this.#socket = socket;
    this.#config = config;
    this.#negotiated = negotiated;
    this.#log = log;
    log.debug({ structured: negotiated.structured, metaContext: negotiated.metaContext, flags: negotiated.transmissionFlags }, 'NBD transmission');
  }

  /**
   * One request (with its payload), or null until all of it has arrived. Throws NbdProtocolError
   * for a bad magic or a write payload over the maximum: the connection is then dropped.
   */
  decode(q: ByteQueue): NbdRequest | null {
    return decodeRequest(q, this.#config.maxPayload);
  }

  /** Runs one request (never NBD_CMD_DISC: the connection ends on it) and answers it. Never rejects. */
  async execute(req: NbdRequest): Promise<void> {
    const c = this.#config;
    const b = c.backend;
    const rejection = checkRequest(req, {
      size: b.size,
      transmissionFlags: this.#negotiated.transmissionFlags,
      metaContext: this.#negotiated.metaContext,
      maxPayload: c.maxPayload,
    });
    if (rejection) {
      this.#log.debug({ cmd: commandName(req.type), errno: errnoName(rejection.errno) }, rejection.message);
      this.#replyError(req, rejection.errno, rejection.message);
      return;
    }
    const offset = Number(req.offset);
    const fua = (req.flags & CmdFlag.FUA) !== 0;
    try {
      switch (req.type) {
        case Cmd.READ:
          this.#replyRead(req, await b.read(offset, req.length));
          return;
        case Cmd.WRITE:
          await b.write(offset, req.data!, { fua });
          break;
        case Cmd.FLUSH:
          await b.flush();
          break;
        case Cmd.TRIM:
          await b.discard(offset, req.length);
          if (fua) await b.flush();
          break;
        case Cmd.WRITE_ZEROES:
          for (let done = 0; done < req.length; ) {
            const n = Math.min(WORK_CHUNK, req.length - done);
            await b.write(offset + done, ZEROES.subarray(0, n));
            done += n;
          }
          if (fua) await b.flush();
          break;
        case Cmd.CACHE:
          for (let done = 0; done < req.length; ) {
            const n = Math.min(WORK_CHUNK, req.length - done);
            await b.read(offset + done, n);
            done += n;
          }
          break;
        case Cmd.BLOCK_STATUS:
          // Every byte is reported as allocated data: true for a cache over a disk, and cheap.
          this.#send(encodeBlockStatusChunk(ReplyFlag.DONE, req.handle, BASE_ALLOCATION_ID, [{ length: req.length, flags: 0 }]));
          return;
      }
      this.#send(encodeSimpleReply(0, req.handle));
    } catch (err) {
      const errno = errnoOf(err);
      const message = err instanceof Error ? err.message : String(err);
      this.#log.warn({ err, cmd: commandName(req.type), offset, length: req.length, errno: errnoName(errno) }, 'NBD request failed');
      this.#replyError(req, errno, message);
    }
  }

  #replyRead(req: NbdRequest, data: Buffer): void {
    const s = this.#socket;
    if (data.byteLength !== req.length) {
      // A short buffer would desynchronise a simple reply's stream; refuse to send it.
      this.#log.error({ offset: Number(req.offset), length: req.length, got: data.byteLength }, 'backend returned a short read');
      this.#replyError(req, Errno.EIO, `backend returned ${data.byteLength} of ${req.length} bytes`);
      return;
    }
    if (!writable(s)) return;
    s.cork();
    if (!this.#negotiated.structured) {
      s.write(encodeSimpleReply(0, req.handle));
      if (data.byteLength > 0) s.write(data);
    } else if (data.byteLength === 0) {
      s.write(encodeNoneChunk(req.handle));
    } else {
      s.write(encodeOffsetDataHeader(ReplyFlag.DONE, req.handle, Number(req.offset), data.byteLength));
      s.write(data);
    }
    s.uncork();
  }

  #replyError(req: NbdRequest, errno: number, message: string): void {
    if (this.#negotiated.structured) this.#send(encodeErrorChunk(req.handle, errno, message));
    else this.#send(encodeSimpleReply(errno, req.handle));
  }

  #send(buf: Buffer): void {
    if (writable(this.#socket)) this.#socket.write(buf);
  }
}

/** A socket that can still take a reply. */
export function writable(socket: net.Socket): boolean {
  return !socket.destroyed && socket.writable;
}
