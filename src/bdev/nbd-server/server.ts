// The NBD server: serves one BlockBackend to any number of connections over a Unix socket (mode
// 0600) or, when asked, TCP. Each connection runs the fixed newstyle handshake, then executes
// requests as they arrive and replies as they finish, in any order. Per connection, requests in
// flight and bytes in flight (payloads plus unsent replies) are bounded; over the bound the socket
// is paused, so a client that sends faster than the backend works, or reads slower than we reply,
// is held back by TCP instead of growing our memory. The codec is in protocol.ts.
import { promises as fsp } from 'node:fs';
import * as net from 'node:net';
import { isMainThread } from 'node:worker_threads';
import { pino, type Logger } from 'pino';
import { InvalidArgumentError, IOFailedError, NbdProtocolError, ioError } from '../../errors.js';
import { assertSafeInteger, assertString, isPowerOfTwo } from '../../validate.js';
import type { BlockBackend } from '../backend.js';
import {
  BASE_ALLOCATION,
  ByteQueue,
  ClientFlag,
  Cmd,
  CmdFlag,
  DEFAULT_PORT,
  Errno,
  HandshakeFlag,
  Info,
  Opt,
  ReplyFlag,
  Rep,
  TxFlag,
  checkRequest,
  commandName,
  decodeClientFlags,
  decodeOption,
  decodeRequest,
  encodeBlockStatusChunk,
  encodeErrorChunk,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeMetaContext,
  encodeNoneChunk,
  encodeOffsetDataHeader,
  encodeOptionError,
  encodeOptionReply,
  encodeServerData,
  encodeSimpleReply,
  errnoName,
  errnoOf,
  optionName,
  parseInfoRequest,
  parseMetaContextRequest,
  type NbdOption,
  type NbdRequest,
} from './protocol.js';

export type NbdAddress = { path: string } | { host: string; port: number };
export type NbdListenAddress = { path: string } | { host?: string; port: number };

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

const MiB = 1 << 20;
const DEFAULT_MAX_PAYLOAD = 32 * MiB;
/** Option data beyond this is not a client we want to serve (strings are at most 4 KiB). */
const MAX_OPTION_DATA = 64 * 1024;
/** Options one connection may send before it is cut off as a denial of service. */
const MAX_OPTIONS = 1024;
/** WRITE_ZEROES and CACHE work through their range in pieces this large. */
const WORK_CHUNK = 4 * MiB;
const ZEROES = Buffer.alloc(WORK_CHUNK);
/** The id of base:allocation in SET_META_CONTEXT replies and BLOCK_STATUS chunks. */
const BASE_ALLOCATION_ID = 1;

interface Config {
  backend: BlockBackend;
  exportName: string;
  names: ReadonlySet<string>;
  description: string;
  maxPayload: number;
  minBlockSize: number;
  preferredBlockSize: number;
  maxInflightRequests: number;
  maxInflightBytes: number;
}

export class NbdServer {
  readonly #config: Config;
  readonly #log: Logger;
  readonly #conns = new Set<Connection>();
  #server: net.Server | null = null;
  #started = false;
  #address: NbdAddress | null = null;
  #closing: Promise<void> | null = null;
  #nextId = 1;

  constructor(options: NbdServerOptions) {
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
    this.#config = {
      backend: b,
      exportName,
      names: new Set([exportName, '', 'ulobdev']),
      description: options.description ?? '',
      maxPayload,
      minBlockSize,
      preferredBlockSize,
      maxInflightRequests,
      maxInflightBytes,
    };
    this.#log = options.logger ?? pino({ enabled: false });
  }

  /** Open connections, counting closed ones whose requests are still running. */
  get connections(): number {
    return this.#conns.size;
  }

  /** Where the server listens (the port TCP actually bound), or null before listen(). */
  get address(): NbdAddress | null {
    return this.#address;
  }

  /** The address as a URL clients take (nbd+unix:///?socket=… or nbd://host:port). */
  get url(): string | null {
    return this.#address ? formatNbdUrl(this.#address) : null;
  }

  async listen(address: NbdListenAddress): Promise<void> {
    if (this.#started || this.#closing) throw new InvalidArgumentError('the NBD server was already started or closed');
    this.#started = true;
    try {
      await this.#listen(address);
    } catch (err) {
      this.#started = false;
      throw err;
    }
  }

  async #listen(address: NbdListenAddress): Promise<void> {
    const server = net.createServer({ allowHalfOpen: true, noDelay: true }, (socket) => this.#accept(socket));
    server.maxConnections = 1024;
    if ('path' in address) {
      assertString(address.path, 'socket path');
      await removeStaleSocket(address.path);
      const listening = listeningOrError(server);
      // bind() creates the socket file inside this synchronous call: under this umask it is 0600
      // from its first moment, with no window for others to connect. The chmod below covers
      // worker threads, which may not change the umask.
      const old = isMainThread ? process.umask(0o177) : undefined;
      try {
        server.listen(address.path);
      } finally {
        if (old !== undefined) process.umask(old);
      }
      await listening.catch((err: unknown) => {
        throw ioError('listen on', address.path, err);
      });
      await fsp.chmod(address.path, 0o600);
      this.#address = { path: address.path };
    } else {
      const host = address.host ?? '127.0.0.1';
      assertSafeInteger(address.port, 'port', 0, 65535);
      const listening = listeningOrError(server);
      server.listen(address.port, host);
      await listening.catch((err: unknown) => {
        throw ioError('listen on', `${host}:${address.port}`, err);
      });
      const bound = server.address() as net.AddressInfo;
      this.#address = { host, port: bound.port };
    }
    server.on('error', (err) => this.#log.error({ err }, 'NBD server error'));
    this.#server = server;
    this.#log.info({ url: this.url }, 'NBD server listening');
  }

  /** Stops accepting, lets every connection finish the requests it has in flight, then closes. */
  close(): Promise<void> {
    this.#closing ??= this.#shutdown();
    return this.#closing;
  }

  async #shutdown(): Promise<void> {
    const server = this.#server;
    const stopped = server ? new Promise<void>((resolve) => server.close(() => resolve())) : Promise.resolve();
    const conns = [...this.#conns];
    for (const c of conns) c.shutdown();
    await Promise.all(conns.map((c) => c.done));
    // Node unlinks the Unix socket file itself when the server closes.
    await stopped;
    this.#log.info('NBD server closed');
  }

  #accept(socket: net.Socket): void {
    if (this.#closing) {
      socket.destroy();
      return;
    }
    const id = this.#nextId++;
    const log = this.#log.child({ conn: id });
    const conn = new Connection(socket, this.#config, log);
    this.#conns.add(conn);
    void conn.done.then(() => this.#conns.delete(conn));
  }
}

type Phase = 'flags' | 'options' | 'transmission' | 'ending' | 'closed';

/** One client. Owned by NbdServer until `done` resolves (socket closed, no request running). */
class Connection {
  readonly done: Promise<void>;
  readonly #socket: net.Socket;
  readonly #config: Config;
  readonly #log: Logger;
  readonly #queue = new ByteQueue();
  #phase: Phase = 'flags';
  #clientFlags = 0;
  #options = 0;
  #structured = false;
  #metaContext = false;
  #transmissionFlags = 0;
  #inflight = 0;
  #inflightBytes = 0;
  #paused = false;
  #pumping = false;
  #socketClosed = false;
  #resolveDone!: () => void;

  constructor(socket: net.Socket, config: Config, log: Logger) {
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
    this.#send(encodeGreeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES));
  }

  /** Server shutdown: a handshake is cut; a transmission finishes what is in flight first. */
  shutdown(): void {
    if (this.#phase === 'transmission') this.#finish('server is shutting down');
    else if (this.#phase !== 'ending') this.#socket.destroy();
  }

  // --- input -----------------------------------------------------------------------------------

  #pump(): void {
    if (this.#pumping) return;
    this.#pumping = true;
    try {
      for (;;) {
        if (this.#phase === 'flags') {
          const flags = decodeClientFlags(this.#queue);
          if (flags === null) break;
          this.#onClientFlags(flags);
        } else if (this.#phase === 'options') {
          const option = decodeOption(this.#queue, MAX_OPTION_DATA);
          if (!option) break;
          this.#onOption(option);
        } else if (this.#phase === 'transmission') {
          if (!this.#canAdmit()) {
            this.#pause();
            return;
          }
          const req = decodeRequest(this.#queue, this.#config.maxPayload);
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

  // --- handshake -------------------------------------------------------------------------------

  #onClientFlags(flags: number): void {
    const unknown = flags & ~(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES);
    if (unknown) throw new NbdProtocolError(`unknown client flags 0x${(flags >>> 0).toString(16)}`);
    this.#clientFlags = flags;
    this.#phase = 'options';
  }

  #onOption({ option, data }: NbdOption): void {
    if (++this.#options > MAX_OPTIONS) throw new NbdProtocolError(`more than ${MAX_OPTIONS} options in one handshake`);
    if (!(this.#clientFlags & ClientFlag.FIXED_NEWSTYLE) && option !== Opt.EXPORT_NAME) {
      throw new NbdProtocolError(`${optionName(option)} from a client that did not agree to fixed newstyle`);
    }
    const c = this.#config;
    switch (option) {
      case Opt.EXPORT_NAME: {
        const name = data.toString('utf8');
        // This option cannot be answered with an error: an unknown name ends the session.
        if (!c.names.has(name)) throw new NbdProtocolError(`NBD_OPT_EXPORT_NAME for unknown export ${JSON.stringify(name)}`);
        this.#enterTransmission();
        this.#send(encodeExportNameReply(c.backend.size, this.#transmissionFlags, !(this.#clientFlags & ClientFlag.NO_ZEROES)));
        return;
      }
      case Opt.ABORT:
        this.#send(encodeOptionReply(option, Rep.ACK));
        this.#finish('client aborted the handshake');
        return;
      case Opt.LIST:
        if (data.byteLength !== 0) return this.#optionError(option, Rep.ERR_INVALID, 'NBD_OPT_LIST takes no data');
        this.#send(encodeOptionReply(option, Rep.SERVER, encodeServerData(c.exportName, c.description)));
        this.#send(encodeOptionReply(option, Rep.ACK));
        return;
      case Opt.INFO:
      case Opt.GO:
        return this.#onInfo(option, data);
      case Opt.STRUCTURED_REPLY:
        if (data.byteLength !== 0) return this.#optionError(option, Rep.ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
        this.#structured = true;
        this.#send(encodeOptionReply(option, Rep.ACK));
        return;
      case Opt.LIST_META_CONTEXT:
      case Opt.SET_META_CONTEXT:
        return this.#onMetaContext(option, data);
      case Opt.STARTTLS:
        return this.#optionError(option, Rep.ERR_UNSUP, 'TLS is not supported by this server');
      default:
        return this.#optionError(option, Rep.ERR_UNSUP, `${optionName(option)} is not supported`);
    }
  }

  #onInfo(option: number, data: Buffer): void {
    const c = this.#config;
    const req = parseInfoRequest(data);
    if (!req) return this.#optionError(option, Rep.ERR_INVALID, `malformed ${optionName(option)}`);
    if (!c.names.has(req.name)) return this.#optionError(option, Rep.ERR_UNKNOWN, `no export named ${JSON.stringify(req.name)}`);
    const flags = this.#flagsFor();
    this.#send(encodeOptionReply(option, Rep.INFO, encodeInfoExport(c.backend.size, flags)));
    const wanted = new Set(req.requests);
    if (wanted.has(Info.NAME)) this.#send(encodeOptionReply(option, Rep.INFO, encodeInfoString(Info.NAME, c.exportName)));
    if (wanted.has(Info.DESCRIPTION) && c.description) {
      this.#send(encodeOptionReply(option, Rep.INFO, encodeInfoString(Info.DESCRIPTION, c.description)));
    }
    if (wanted.has(Info.BLOCK_SIZE)) {
      // A minimum the size is not a multiple of would make clients drop the tail; say 1 then.
      const min = c.backend.size % c.minBlockSize === 0 ? c.minBlockSize : 1;
      this.#send(encodeOptionReply(option, Rep.INFO, encodeInfoBlockSize(min, c.preferredBlockSize, c.maxPayload)));
    }
    this.#send(encodeOptionReply(option, Rep.ACK));
    if (option === Opt.GO) this.#enterTransmission();
  }

  #onMetaContext(option: number, data: Buffer): void {
    if (!this.#structured) return this.#optionError(option, Rep.ERR_INVALID, 'negotiate structured replies first');
    const req = parseMetaContextRequest(data);
    if (!req) return this.#optionError(option, Rep.ERR_INVALID, `malformed ${optionName(option)}`);
    if (!this.#config.names.has(req.name)) return this.#optionError(option, Rep.ERR_UNKNOWN, `no export named ${JSON.stringify(req.name)}`);
    if (option === Opt.LIST_META_CONTEXT) {
      const all = req.queries.length === 0 || req.queries.some((q) => q === 'base:' || q === BASE_ALLOCATION);
      if (all) this.#send(encodeOptionReply(option, Rep.META_CONTEXT, encodeMetaContext(0, BASE_ALLOCATION)));
    } else {
      this.#metaContext = req.queries.includes(BASE_ALLOCATION);
      if (this.#metaContext) this.#send(encodeOptionReply(option, Rep.META_CONTEXT, encodeMetaContext(BASE_ALLOCATION_ID, BASE_ALLOCATION)));
    }
    this.#send(encodeOptionReply(option, Rep.ACK));
  }

  #optionError(option: number, type: number, message: string): void {
    this.#log.debug({ option: optionName(option), reply: type >>> 0 }, message);
    this.#send(encodeOptionError(option, type, message));
  }

  #flagsFor(): number {
    let f = TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_CACHE | TxFlag.CAN_MULTI_CONN;
    if (this.#config.backend.readOnly) f |= TxFlag.READ_ONLY;
    else f |= TxFlag.SEND_FUA | TxFlag.SEND_TRIM | TxFlag.SEND_WRITE_ZEROES;
    // Every read is answered with one data chunk, so "don't fragment" costs nothing.
    if (this.#structured) f |= TxFlag.SEND_DF;
    return f;
  }

  #enterTransmission(): void {
    this.#transmissionFlags = this.#flagsFor();
    this.#phase = 'transmission';
    this.#log.debug({ structured: this.#structured, metaContext: this.#metaContext, flags: this.#transmissionFlags }, 'NBD transmission');
  }

  // --- transmission ----------------------------------------------------------------------------

  #onRequest(req: NbdRequest): void {
    if (req.type === Cmd.DISC) {
      this.#finish('client sent NBD_CMD_DISC');
      return;
    }
    const cost = req.type === Cmd.READ || req.type === Cmd.WRITE ? req.length : 0;
    this.#inflight++;
    this.#inflightBytes += cost;
    void this.#execute(req).finally(() => {
      this.#inflight--;
      this.#inflightBytes -= cost;
      if (this.#phase === 'transmission') this.#pump();
      else this.#settle();
    });
  }

  async #execute(req: NbdRequest): Promise<void> {
    const c = this.#config;
    const b = c.backend;
    const rejection = checkRequest(req, {
      size: b.size,
      transmissionFlags: this.#transmissionFlags,
      metaContext: this.#metaContext,
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
    if (!this.#writable()) return;
    s.cork();
    if (!this.#structured) {
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
    if (this.#structured) this.#send(encodeErrorChunk(req.handle, errno, message));
    else this.#send(encodeSimpleReply(errno, req.handle));
  }

  // --- output and teardown ---------------------------------------------------------------------

  #writable(): boolean {
    return !this.#socket.destroyed && this.#socket.writable;
  }

  #send(buf: Buffer): void {
    if (this.#writable()) this.#socket.write(buf);
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

// --- addresses ---------------------------------------------------------------------------------

/**
 * The address in an NBD URL: nbd+unix:///[EXPORT]?socket=PATH or nbd://HOST[:PORT][/EXPORT]
 * (port 10809 by default). The export name, if any, is not part of the address and is ignored.
 */
export function parseNbdUrl(url: string): NbdAddress {
  assertString(url, 'NBD URL');
  const usage = 'use nbd+unix:///?socket=PATH or nbd://HOST[:PORT]';
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new InvalidArgumentError(`${JSON.stringify(url)} is not an NBD URL; ${usage}`);
  }
  if (u.protocol === 'nbd+unix:') {
    const path = u.searchParams.get('socket');
    if (u.host !== '') throw new InvalidArgumentError(`${JSON.stringify(url)}: an nbd+unix URL has no host; ${usage}`);
    if (!path) throw new InvalidArgumentError(`${JSON.stringify(url)} names no socket; ${usage}`);
    return { path };
  }
  if (u.protocol === 'nbd:') {
    const host = u.hostname.replace(/^\[(.*)\]$/, '$1');
    if (!host) throw new InvalidArgumentError(`${JSON.stringify(url)} names no host; ${usage}`);
    const port = u.port === '' ? DEFAULT_PORT : Number(u.port);
    return { host, port };
  }
  if (u.protocol === 'nbds:' || u.protocol === 'nbds+unix:') {
    throw new InvalidArgumentError(`${JSON.stringify(url)}: NBD over TLS is not supported; ${usage}`);
  }
  throw new InvalidArgumentError(`${JSON.stringify(url)} is not an NBD URL (scheme ${u.protocol}); ${usage}`);
}

export function formatNbdUrl(address: NbdAddress): string {
  if ('path' in address) return `nbd+unix:///?socket=${encodeURIComponent(address.path).replace(/%2F/g, '/')}`;
  const host = address.host.includes(':') ? `[${address.host}]` : address.host;
  return `nbd://${host}:${address.port}`;
}

// --- helpers -----------------------------------------------------------------------------------

function listeningOrError(server: net.Server): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (err: Error) => {
      server.off('listening', onListening);
      reject(err);
    };
    const onListening = () => {
      server.off('error', onError);
      resolve();
    };
    server.once('error', onError);
    server.once('listening', onListening);
  });
}

/**
 * Removes a socket file nobody listens on (left by a crash). Anything else at the path, or a
 * socket someone still serves, is refused rather than touched.
 */
async function removeStaleSocket(path: string): Promise<void> {
  let st;
  try {
    st = await fsp.lstat(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw ioError('inspect', path, err);
  }
  if (!st.isSocket()) throw new InvalidArgumentError(`${path} exists and is not a socket; choose another path for the NBD socket`);
  const probe = await new Promise<NodeJS.ErrnoException | null>((resolve) => {
    const socket = net.connect(path);
    socket.once('connect', () => {
      socket.destroy();
      resolve(null);
    });
    socket.once('error', (err) => resolve(err));
  });
  if (!probe) throw new IOFailedError(`cannot listen on ${path}: another server is listening there`, { path, syscall: 'bind' });
  if (probe.code !== 'ECONNREFUSED') throw ioError('probe the old socket', path, probe);
  await fsp.rm(path, { force: true });
}
