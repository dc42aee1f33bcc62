// The NBD server's listener: serves one BlockBackend to any number of connections over a Unix
// socket (mode 0600) or, when asked, TCP, and the NBD URLs that name such an address. Each
// connection (connection.ts) runs the handshake (handshake.ts), then the transmission
// (transmission.ts); the codec is in protocol.ts.
import { promises as fsp } from 'node:fs';
import * as net from 'node:net';
import { isIP } from 'node:net';
import { isMainThread } from 'node:worker_threads';
import { pino, type Logger } from 'pino';
import { InvalidArgumentError, IOFailedError, ioError } from '../../errors.js';
import { assertSafeInteger, assertString } from '../../validate.js';
import { Connection } from './connection.js';
import { exportConfig, type ExportConfig, type NbdServerOptions } from './export.js';
import { DEFAULT_PORT } from './protocol.js';

/** Connections served at once; more are closed as they come. */
const MAX_CONNECTIONS = 1024;

export type { NbdServerOptions } from './export.js';

export type NbdAddress = { path: string } | { host: string; port: number };
export type NbdListenAddress = { path: string } | { host?: string; port: number };

export class NbdServer {
  readonly #config: ExportConfig;
  readonly #log: Logger;
  readonly #conns = new Set<Connection>();
  #server: net.Server | null = null;
  #started = false;
  #address: NbdAddress | null = null;
  #closing: Promise<void> | null = null;
  #nextId = 1;
  readonly #allowRemote: boolean;

  /** InvalidArgumentError names the first bad option (exportConfig). */
  constructor(options: NbdServerOptions & { allowRemote?: boolean }) {
    this.#config = exportConfig(options);
    this.#log = options.logger ?? pino({ enabled: false });
    this.#allowRemote = options.allowRemote === true;
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

  /**
   * Listens on a Unix socket (created 0600) or a TCP address (127.0.0.1 unless a host is given).
   * A TCP address other machines can reach is refused unless the server was made with
   * `allowRemote` (assertLocalAddress). InvalidArgumentError, IOFailedError when it cannot bind.
   */
  async listen(address: NbdListenAddress): Promise<void> {
    if (this.#started || this.#closing) throw new InvalidArgumentError('the NBD server was already started or closed');
    assertLocalAddress(address, { allowRemote: this.#allowRemote, what: 'the export' });
    this.#started = true;
    try {
      await this.#listen(address);
    } catch (err) {
      this.#started = false;
      throw err;
    }
  }

  async #listen(address: NbdListenAddress): Promise<void> {
    // Paused: each Connection takes its socket over before anything is read (connection.ts).
    const server = net.createServer({ allowHalfOpen: true, noDelay: true, pauseOnConnect: true }, (socket) => this.#accept(socket));
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
    // Counted here, not by net.Server's maxConnections: a connection that reads into its own
    // buffers has moved its socket off the server's count.
    if (this.#conns.size >= MAX_CONNECTIONS) {
      this.#log.warn({ connections: this.#conns.size }, 'NBD connection refused: too many connections');
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

/**
 * True for a host only this machine can reach: 127.0.0.0/8, ::1 (also as ::ffff:127.x.y.z) and
 * localhost. Any other name or address (0.0.0.0, ::, a LAN address, a host name) is reachable from
 * elsewhere, or may be.
 */
export function isLoopbackHost(host: string): boolean {
  const h = host.replace(/^\[(.*)\]$/, '$1').toLowerCase();
  if (h === 'localhost' || h === 'localhost.') return true;
  if (isIP(h) === 4) return h.startsWith('127.');
  if (isIP(h) === 6) return h === '::1' || h === '0:0:0:0:0:0:0:1' || /^::ffff:127\./.test(h);
  return false;
}

/**
 * Refuses a TCP address that other machines can reach unless `allowRemote`: NBD has no
 * authentication and no encryption here, so anyone who reaches the port reads (and in write-back
 * mode writes) the whole disk. InvalidArgumentError says what would be exposed and the two ways on.
 */
export function assertLocalAddress(address: NbdListenAddress, options: { allowRemote?: boolean; what?: string; writable?: boolean } = {}): void {
  if ('path' in address) return;
  const host = address.host ?? '127.0.0.1';
  if (options.allowRemote || isLoopbackHost(host)) return;
  const shown = formatNbdUrl({ host, port: address.port });
  const access = options.writable === false ? 'read' : options.writable ? 'read and write' : 'read (and, if writable, write)';
  throw new InvalidArgumentError(
    `${shown} would let anyone who can reach port ${address.port} of this machine ${access} ${options.what ?? 'the export'}, with no password and no encryption; listen on 127.0.0.1 or a unix socket, or pass --allow-remote if that is what you want`,
  );
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
