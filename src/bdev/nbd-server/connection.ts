// One client connection of the NBD server: reads the socket into a byte queue and hands it to the
// handshake, then to the transmission, and bounds what one client may have in flight. Per
// connection, requests in flight and bytes in flight (payloads plus unsent replies) are bounded;
// over the bound the socket is paused, so a client that sends faster than the backend works, or
// reads slower than we reply, is held back by TCP instead of growing our memory.
import type * as net from 'node:net';
import type { Logger } from 'pino';
import { NbdProtocolError } from '../../errors.js';
import type { ExportConfig } from './export.js';
import { Handshake } from './handshake.js';
import { ByteQueue, Cmd, type NbdRequest } from './protocol.js';
import { Transmission, writable } from './transmission.js';

type Phase = 'handshake' | 'transmission' | 'ending' | 'closed';

/** One client. Owned by NbdServer until `done` resolves (socket closed, no request running). */
export class Connection {
  readonly done: Promise<void>;
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

  constructor(socket: net.Socket, config: ExportConfig, log: Logger) {
    this.#socket = socket;
    this.#config = config;
    this.#log = log;
    this.done = new Promise((resolve) => (this.#resolveDone = resolve));
    socket.on('data', (chunk: Buffer) => {
      if (this.#phase === 'ending' || this.#phase === 'closed') return;
      this.#queue.push(chunk);
      this.#pump();
    });
    socket.on('end', () => this.#finish('client closed its end'));
    socket.on('drain', () => this.#pump());
    socket.on('error', (err) => this.#log.debug({ err }, 'NBD connection error'));
    socket.on('close', () => {
      this.#socketClosed = true;
      this.#phase = 'closed';
      this.#queue.clear();
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

  #pump(): void {
    if (this.#pumping) return;
    this.#pumping = true;
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
          if (!this.#canAdmit()) {
            this.#pause();
            return;
          }
          const req = this.#transmission!.decode(this.#queue);
          if (!req) break;
          this.#onRequest(req);
        } else {
          return;
        }
      }
      this.#resume();
    } catch (err) {
      this.#abort(err);
    } finally {
      this.#pumping = false;
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
    const cost = req.type === Cmd.READ || req.type === Cmd.WRITE ? req.length : 0;
    this.#inflight++;
    this.#inflightBytes += cost;
    void this.#transmission!.execute(req).finally(() => {
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
