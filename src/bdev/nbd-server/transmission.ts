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
  OFFSET_DATA_HEADER_SIZE,
  SIMPLE_REPLY_SIZE,
  decodeRequestStart,
  encodeBlockStatusChunk,
  encodeErrorChunk,
  encodeNoneChunk,
  encodeOffsetDataHeader,
  encodeSimpleReply,
  errnoName,
  errnoOf,
  writeOffsetDataHeader,
  writeSimpleReply,
  type NbdRequest,
  type RequestRejection,
  type RequestStart,
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
  /** The socket is corked until the end of this event-loop turn (#send). */
  #corked = false;
  /** Open beginBatch() calls: while above 0 the socket is corked until endBatch(). */
  #batch = 0;
  /** The outermost beginBatch() corked the socket (it was writable then): endBatch() uncorks it. */
  #batchCorked = false;
  readonly #allocPayload: (length: number) => Buffer;

  constructor(socket: net.Socket, config: ExportConfig, negotiated: Negotiated, log: Logger) {
    this.#socket = socket;
    this.#config = config;
    this.#negotiated = negotiated;
    this.#log = log;
    this.#allocPayload = (length) => config.buffers.take(length);
    log.debug({ structured: negotiated.structured, metaContext: negotiated.metaContext, flags: negotiated.transmissionFlags }, 'NBD transmission');
  }

  /**
   * One request once its header has arrived, with as much of a write's payload as is queued
   * (decodeRequestStart: the caller reads the rest into req.data), or null until then. Throws
   * NbdProtocolError for a bad magic or a write payload over the maximum: the connection is then
   * dropped.
   */
  decode(q: ByteQueue): RequestStart | null {
    return decodeRequestStart(q, this.#config.maxPayload, this.#allocPayload);
  }

  /**
   * Runs one request (never NBD_CMD_DISC: the connection ends on it) and answers it. Returns null
   * when it was done and answered now (#executeNow: a read hit, a rewrite of dirty blocks), else a
   * promise of the same, which never rejects.
   */
  execute(req: NbdRequest): Promise<void> | null {
    const rejection = this.#check(req);
    if (!rejection && this.#executeNow(req)) return null;
    return this.#executeLater(req, rejection);
  }

  /**
   * Why `req` must be answered with an error (checkRequest against what this connection
   * negotiated and the backend's current size), or null when it may run. Called once per request.
   */
  #check(req: NbdRequest): RequestRejection | null {
    return checkRequest(req, {
      size: this.#config.backend.size,
      transmissionFlags: this.#negotiated.transmissionFlags,
      metaContext: this.#negotiated.metaContext,
      maxPayload: this.#config.maxPayload,
    });
  }

  async #executeLater(req: NbdRequest, rejection: RequestRejection | null): Promise<void> {
    try {
      await this.#execute(req, rejection);
    } finally {
      // The backend is done with the payload (its write has completed or failed).
      if (req.pooled) this.#config.buffers.release(req.data!);
    }
  }

  /**
   * A READ or WRITE (no FUA) the backend can do now (BlockBackend.readNow, writeNow), answered at
   * once: no promise, no turn of the event loop between the request and its reply. Only for a
   * request #check() passed. False: nothing was sent; the request goes the usual way (#execute).
   */
  #executeNow(req: NbdRequest): boolean {
    const c = this.#config;
    const b = c.backend;
    if (req.type === Cmd.READ) {
      if (!b.readNow || req.length === 0) return false;
    } else if (req.type === Cmd.WRITE) {
      if (!b.writeNow || (req.flags & CmdFlag.FUA) !== 0) return false;
    } else {
      return false;
    }
    const offset = Number(req.offset);
    const buffers = c.buffers;
    if (req.type === Cmd.WRITE) {
      if (!b.writeNow!(offset, req.data!)) return false;
      if (req.pooled) buffers.release(req.data!);
      const reply = buffers.take(SIMPLE_REPLY_SIZE);
      writeSimpleReply(reply, 0, req.handle);
      this.#send(reply);
      return true;
    }
    const structured = this.#negotiated.structured;
    const header = structured ? OFFSET_DATA_HEADER_SIZE : SIMPLE_REPLY_SIZE;
    const reply = buffers.take(header + req.length);
    if (!b.readNow!(reply.subarray(header), offset)) {
      buffers.release(reply);
      return false;
    }
    if (structured) writeOffsetDataHeader(reply, ReplyFlag.DONE, req.handle, offset, req.length);
    else writeSimpleReply(reply, 0, req.handle);
    this.#send(reply, () => buffers.release(reply));
    return true;
  }

  /**
   * Replies sent until endBatch() leave together, when it is called, in one write: the
   * connection opens a batch around the requests it decodes from one read of its socket, so the
   * replies of those done at once (#executeNow) go out in the same turn, with no wait for the end
   * of it. Batches nest.
   */
  beginBatch(): void {
    if (this.#batch++ === 0 && writable(this.#socket)) {
      this.#batchCorked = true;
      this.#socket.cork();
    }
  }

  /** Ends beginBatch()'s batch: the outermost one sends what it gathered. */
  endBatch(): void {
    if (--this.#batch > 0 || !this.#batchCorked) return;
    this.#batchCorked = false;
    // uncork() of a socket ended or destroyed meanwhile does nothing harmful.
    this.#socket.uncork();
  }

  /** Runs `req` the usual way; `rejection` is #check()'s verdict on it (answered as an error). */
  async #execute(req: NbdRequest, rejection: RequestRejection | null): Promise<void> {
    const b = this.#config.backend;
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
          if (b.readInto && req.length > 0) await this.#replyReadInto(req, offset);
          else this.#replyRead(req, await b.read(offset, req.length));
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
          if (b.zero) {
            await b.zero(offset, req.length, { fua });
            break;
          }
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
      const reply = this.#config.buffers.take(SIMPLE_REPLY_SIZE);
      writeSimpleReply(reply, 0, req.handle);
      this.#send(reply);
    } catch (err) {
      const errno = errnoOf(err);
      const message = err instanceof Error ? err.message : String(err);
      this.#log.warn({ err, cmd: commandName(req.type), offset, length: req.length, errno: errnoName(errno) }, 'NBD request failed');
      this.#replyError(req, errno, message);
    }
  }

  /**
   * A read answered from one buffer: the reply header, then the backend's bytes read right behind
   * it, sent with one write. The buffer goes back to the pool once the socket has sent it.
   */
  async #replyReadInto(req: NbdRequest, offset: number): Promise<void> {
    const structured = this.#negotiated.structured;
    const header = structured ? OFFSET_DATA_HEADER_SIZE : SIMPLE_REPLY_SIZE;
    const buffers = this.#config.buffers;
    const reply = buffers.take(header + req.length);
    try {
      await this.#config.backend.readInto!(reply.subarray(header), offset);
    } catch (err) {
      buffers.release(reply);
      throw err;
    }
    if (structured) writeOffsetDataHeader(reply, ReplyFlag.DONE, req.handle, offset, req.length);
    else writeSimpleReply(reply, 0, req.handle);
    this.#send(reply, () => buffers.release(reply));
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
    // Header and data go out together: #send corks the socket until the end of the turn.
    if (!this.#negotiated.structured) {
      this.#send(encodeSimpleReply(0, req.handle));
      if (data.byteLength > 0) this.#send(data);
    } else if (data.byteLength === 0) {
      this.#send(encodeNoneChunk(req.handle));
    } else {
      this.#send(encodeOffsetDataHeader(ReplyFlag.DONE, req.handle, Number(req.offset), data.byteLength));
      this.#send(data);
    }
  }

  #replyError(req: NbdRequest, errno: number, message: string): void {
    if (this.#negotiated.structured) this.#send(encodeErrorChunk(req.handle, errno, message));
    else this.#send(encodeSimpleReply(errno, req.handle));
  }

  /**
   * Queues a reply. Inside a batch (beginBatch) it leaves with the batch's end; otherwise the
   * socket stays corked until the end of this event-loop turn (setImmediate), so every reply
   * finished in one turn leaves in one writev instead of one syscall each. `done`
   * runs once the socket is finished with `buf` (sent, or the socket is gone).
   */
  #send(buf: Buffer, done?: () => void): void {
    const s = this.#socket;
    if (!writable(s)) {
      done?.();
      return;
    }
    if (this.#batch === 0 && !this.#corked) {
      this.#corked = true;
      s.cork();
      setImmediate(this.#uncork);
    }
    if (done) s.write(buf, () => done());
    else s.write(buf);
  }

  readonly #uncork = (): void => {
    this.#corked = false;
    // end() or destroy() may have come first; uncork() on such a socket does nothing harmful.
    this.#socket.uncork();
  };
}

/** A socket that can still take a reply. */
export function writable(socket: net.Socket): boolean {
  return !socket.destroyed && socket.writable;
}
