// One client connection of the NBD server: reads the socket into a byte queue and hands it to the
// handshake, then to the transmission, and bounds what one client may have in flight. Per
// connection, requests in flight and bytes in flight (payloads plus unsent replies) are bounded;
// over the bound the socket is paused, so a client that sends faster than the backend works, or
// reads slower than we reply, is held back by TCP instead of growing our memory.
//
// The socket is read into memory of the connection's own (Node's `onread` buffers, readIntoOwn):
// headers into one reused read buffer, and a write's payload, once its header is decoded,
// straight into the pooled buffer the backend writes from, as nbdkit recv()s into its request
// buffer. Node's own reads would allocate a fresh 64 KiB buffer per read (a 1 MiB write is 16 of
// them, each a 'data' event and garbage to collect) and the payload would be copied out of them
// again (bench/README.md, "Session 9").
import * as net from 'node:net';
import type { Logger } from 'pino';
import { NbdProtocolError } from '../../errors.js';
import type { ExportConfig } from './export.js';
import { Handshake } from './handshake.js';
import { ByteQueue, Cmd, type NbdRequest, type RequestStart } from './protocol.js';
import { Transmission, writable } from './transmission.js';

type Phase = 'handshake' | 'transmission' | 'ending' | 'closed';

/**
 * Bytes of the reused buffer that headers (and small writes' payloads) are read into. The part of
 * a payload that arrives in it behind its header is copied out (decodeRequestStart): 64 KiB bounds
 * that at 1/16 of a 1 MiB write and still takes about fifteen 4 KiB writes per read.
 */
const READ_BUFFER_BYTES = 64 * 1024;

/** One client. Owned by NbdServer until `done` resolves (socket closed, no request running). */
export class Connection {
  readonly done: Promise<void>;
  /** True when the socket is read into the connection's own buffers (readIntoOwn), not by 'data' events. */
  readonly ownReads: boolean;
  readonly #socket: net.Socket;
  readonly #config: ExportConfig;
  readonly #log: Logger;
  readonly #queue = new ByteQueue();
  readonly #handshake: Handshake;
  #transmission: Transmission | null = null;
  #phase: Phase = 'handshake';
  #inflight = 0;
  #inflightBytes = 0;
  #paused = false;
  #pumping = false;
  #socketClosed = false;
  #resolveDone!: () => void;
  /** A write whose header is decoded and whose payload is still arriving (into req.data). */
  #payload: RequestStart | null = null;
  /** The buffer the socket read into last time (own reads): the read buffer or a payload's rest. */
  #reading: Buffer | null = null;
  readonly #readBuffer: Buffer | null;

  /**
   * Takes over `socket`, which should be paused (the server's pauseOnConnect): its reads go to
   * the connection's own buffers where this Node allows (readIntoOwn), else to 'data' events.
   */
  constructor(socket: net.Socket, config: ExportConfig, log: Logger) {
    this.#config = config;
    this.#log = log;
    this.done = new Promise((resolve) => (this.#resolveDone = resolve));
    this.#readBuffer = Buffer.allocUnsafe(READ_BUFFER_BYTES);
    const own = readIntoOwn(
      socket,
      () => this.#nextReadBuffer(),
      (n) => this.#onOwnRead(n),
    );
    this.ownReads = own !== null;
    if (own) {
      socket = own;
    } else {
      this.#readBuffer = null;
      socket.on('data', (chunk: Buffer) => this.#onBytes(chunk, false));
      socket.resume();
    }
    this.#socket = socket;
    socket.on('end', () => this.#finish('client closed its end'));
    socket.on('drain', () => this.#pump());
    socket.on('error', (err) => this.#log.debug({ err }, 'NBD connection error'));
    socket.on('close', () => {
      this.#socketClosed = true;
      this.#phase = 'closed';
      this.#queue.clear();
      this.#dropPayload();
      this.#log.debug('NBD connection closed');
      this.#settle();
    });
    log.debug({ peer: socket.remoteAddress ?? 'unix' }, 'NBD connection');
    this.#handshake = new Handshake(config, (buf) => this.#send(buf), log);
  }

  /** Server shutdown: a handshake is cut; a transmission finishes what is in flight first. */
  shutdown(): void {
    if (this.#phase === 'transmission') this.#finish('server is shutting down');
    else if (this.#phase !== 'ending') this.#socket.destroy();
  }

  /** The memory the socket reads into next: the rest of a payload being received, else the read buffer. */
  #nextReadBuffer(): Buffer {
    const p = this.#payload;
    this.#reading = p ? p.req.data!.subarray(p.have) : this.#readBuffer!;
    return this.#reading;
  }

  /** `n` bytes arrived in #reading. */
  #onOwnRead(n: number): void {
    const into = this.#reading!;
    if (into === this.#readBuffer) {
      this.#onBytes(into.subarray(0, n), true);
      return;
    }
    // Straight into a payload: nothing else is queued while one is being received.
    this.#onBytes(null, true, n);
  }

  /**
   * Bytes from the socket: `chunk`, or (own reads) `direct` bytes already in the payload being
   * received. `transient`: chunk is the reused read buffer, so whatever stays queued is copied.
   */
  #onBytes(chunk: Buffer | null, transient: boolean, direct = 0): void {
    if (this.#phase === 'ending' || this.#phase === 'closed') return;
    // A write completed by these bytes and the requests behind it: their replies leave together.
    const batch = this.#transmission;
    batch?.beginBatch();
    try {
      let used = direct;
      const p = this.#payload;
      if (p) {
        if (chunk) {
          used = Math.min(chunk.byteLength, p.req.length - p.have);
          chunk.copy(p.req.data!, p.have, 0, used);
        }
        p.have += used;
        if (p.have === p.req.length) {
          this.#payload = null;
          this.#onRequest(p.req);
        }
      }
      if (chunk && used < chunk.byteLength) this.#queue.push(used === 0 ? chunk : chunk.subarray(used));
      this.#pump();
      if (transient) this.#queue.own();
    } finally {
      batch?.endBatch();
    }
  }

  /**
   * Forgets a payload that will never be complete. Its buffer is not given back to the pool: the
   * socket's reader may still point into it until the handle is closed; the garbage collector
   * frees it.
   */
  #dropPayload(): void {
    this.#payload = null;
  }

  #pump(): void {
    if (this.#pumping) return;
    this.#pumping = true;
    // The replies of requests done at once (a hit) leave together when this pump ends.
    const batch = this.#transmission;
    batch?.beginBatch();
    try {
      for (;;) {
        if (this.#phase === 'handshake') {
          const step = this.#handshake.step(this.#queue);
          if (step === 'wait') break;
          if (step === 'aborted') this.#finish('client aborted the handshake');
          else if (step === 'transmission') {
            this.#transmission = new Transmission(this.#socket, this.#config, this.#handshake.negotiated, this.#log);
            this.#phase = 'transmission';
          }
        } else if (this.#phase === 'transmission') {
          // The bytes after a payload's header are its payload until it is complete.
          if (this.#payload) break;
          if (!this.#canAdmit()) {
            this.#pause();
            return;
          }
          const start = this.#transmission!.decode(this.#queue);
          if (!start) break;
          if (start.req.data && start.have < start.req.length) {
            // The rest of the payload is read into req.data as it arrives (#onBytes).
            this.#payload = start;
            break;
          }
          this.#onRequest(start.req);
        } else {
          return;
        }
      }
      this.#resume();
    } catch (err) {
      this.#abort(err);
    } finally {
      this.#pumping = false;
      batch?.endBatch();
    }
  }

  #canAdmit(): boolean {
    const c = this.#config;
    if (this.#socket.writableLength >= c.maxInflightBytes) return false; // resumed by 'drain'
    if (this.#inflight === 0) return true;
    return this.#inflight < c.maxInflightRequests && this.#inflightBytes < c.maxInflightBytes;
  }

  #pause(): void {
    if (!this.#paused) this.#socket.pause();
    this.#paused = true;
  }

  #resume(): void {
    if (this.#paused && this.#phase !== 'ending') this.#socket.resume();
    this.#paused = false;
  }

  #onRequest(req: NbdRequest): void {
    if (req.type === Cmd.DISC) {
      this.#finish('client sent NBD_CMD_DISC');
      return;
    }
    const running = this.#transmission!.execute(req);
    // Done and answered already (a hit): nothing in flight to count.
    if (!running) return;
    const cost = req.type === Cmd.READ || req.type === Cmd.WRITE ? req.length : 0;
    this.#inflight++;
    this.#inflightBytes += cost;
    void running.finally(() => {
      this.#inflight--;
      this.#inflightBytes -= cost;
      if (this.#phase === 'transmission') this.#pump();
      else this.#settle();
    });
  }

  #send(buf: Buffer): void {
    if (writable(this.#socket)) this.#socket.write(buf);
  }

  /** Soft end: read nothing more, reply to what is in flight, then close. */
  #finish(reason: string): void {
    if (this.#phase === 'ending' || this.#phase === 'closed') return;
    this.#log.debug({ inflight: this.#inflight }, reason);
    this.#phase = 'ending';
    this.#queue.clear();
    this.#dropPayload();
    this.#socket.pause();
    this.#settle();
  }

  /** Hard end for a peer that broke the protocol: logged once, the socket is dropped. */
  #abort(err: unknown): void {
    if (this.#phase === 'closed') return;
    const reason = err instanceof Error ? err.message : String(err);
    if (err instanceof NbdProtocolError) this.#log.warn({ reason }, 'closing NBD connection: protocol violation');
    else this.#log.error({ err }, 'closing NBD connection: internal error');
    this.#phase = 'closed';
    this.#queue.clear();
    this.#dropPayload();
    this.#socket.destroy();
  }

  /** Ends the socket once nothing is in flight; resolves `done` once it is also closed. */
  #settle(): void {
    if (this.#inflight > 0) return;
    if (this.#socketClosed) {
      this.#resolveDone();
      return;
    }
    if (this.#phase === 'ending' && !this.#socket.writableEnded) {
      // Destroy after the last byte is handed to the kernel: a client that never closes its end
      // must not keep the connection (and server.close()) open.
      this.#socket.end(() => this.#socket.destroy());
    }
  }
}

/** What Node keeps of a stream socket's libuv handle (not public API; checked before use). */
interface StreamHandle {
  useUserBuffer?: unknown;
  readStart?: unknown;
}

/**
 * `socket` (paused, not yet read) re-made as a socket that reads into caller-given memory: Node's
 * `onread` option, whose `buffer` function is asked for the memory of each next read and whose
 * `callback` gets the bytes read into it. net.Server cannot give accepted sockets that option, so
 * the accepted socket's handle moves to a new net.Socket made with it, and the old one, without a
 * handle, is destroyed (which only emits its 'close' and uncounts it from its server). Returns
 * null, leaving `socket` as it was, where the handle is not there or lacks useUserBuffer (another
 * kind of stream, another Node): the caller then reads 'data' events.
 */
function readIntoOwn(socket: net.Socket, nextBuffer: () => Buffer, onRead: (n: number) => void): net.Socket | null {
  const old = socket as unknown as { _handle?: StreamHandle | null };
  const handle = old._handle;
  if (!handle || typeof handle.useUserBuffer !== 'function' || typeof handle.readStart !== 'function' || socket.destroyed) return null;
  old._handle = null;
  socket.destroy();
  const options = {
    handle,
    allowHalfOpen: true,
    readable: true,
    writable: true,
    onread: {
      buffer: nextBuffer,
      callback: (n: number) => {
        onRead(n);
      },
    },
  };
  return new net.Socket(options as net.SocketConstructorOpts);
}
