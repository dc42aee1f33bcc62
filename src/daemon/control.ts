// The per-device control socket (/run/ulobdev/NAME.sock, mode 0600): one JSON request per line,
// one JSON answer per line. `status`, `flush`, `report` and `detach` talk to the daemon through it
// (docs/reference.md, "Messages").
import { promises as fsp } from 'node:fs';
import net from 'node:net';
import {
  ControlProtocolError,
  DaemonError,
  DaemonTimeoutError,
  DeviceBusyError,
  errorFromCode,
  errorToWire,
  InvalidArgumentError,
  IOFailedError,
  NotAttachedError,
  PermissionDeniedError,
} from '../errors.js';

export type ControlRequest = { cmd: 'status' } | { cmd: 'detach' } | { cmd: string; [key: string]: unknown };
export type ControlReply = { ok: true; [key: string]: unknown } | { ok: false; error: { code: string; message: string } };
export type ControlHandler = (request: ControlRequest) => Promise<Record<string, unknown>>;

const MAX_REQUEST = 64 * 1024;

export class ControlServer {
  readonly path: string;
  readonly #server: net.Server;
  readonly #clients: Set<Client>;

  private constructor(path: string, server: net.Server, clients: Set<Client>) {
    this.path = path;
    this.#server = server;
    this.#clients = clients;
  }

  static async listen(path: string, handler: ControlHandler): Promise<ControlServer> {
    await removeStaleSocket(path);
    const clients = new Set<Client>();
    const server = net.createServer((socket) => serve(socket, handler, clients));
    const oldMask = process.umask(0o177);
    try {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(path, () => {
          server.off('error', reject);
          resolve();
        });
      });
    } finally {
      process.umask(oldMask);
    }
    await fsp.chmod(path, 0o600);
    return new ControlServer(path, server, clients);
  }

  /**
   * Stops listening. Connected clients get the answers still pending (a `detach` request closes
   * the server it is answered by), then their connection ends.
   */
  async close(): Promise<void> {
    // Not awaiting the server's close: that waits for every connection, including the one whose
    // `detach` request is being answered by this very close.
    this.#server.close();
    for (const client of this.#clients) {
      client.closing = true;
      if (client.pending === 0) client.socket.end();
    }
    await fsp.rm(this.path, { force: true });
  }
}

interface Client {
  socket: net.Socket;
  pending: number;
  closing: boolean;
}

function serve(socket: net.Socket, handler: ControlHandler, clients: Set<Client>): void {
  const client: Client = { socket, pending: 0, closing: false };
  clients.add(client);
  let buffered = '';
  socket.setEncoding('utf8');
  socket.on('error', () => socket.destroy());
  socket.on('close', () => clients.delete(client));
  socket.on('data', (chunk: string) => {
    buffered += chunk;
    if (buffered.length > MAX_REQUEST) return socket.destroy();
    let nl: number;
    while ((nl = buffered.indexOf('\n')) >= 0) {
      const line = buffered.slice(0, nl);
      buffered = buffered.slice(nl + 1);
      client.pending++;
      void answer(line, handler).then((reply) => {
        client.pending--;
        if (!socket.destroyed) socket.write(JSON.stringify(reply) + '\n');
        if (client.closing && client.pending === 0) socket.end();
      });
    }
  });
}

async function answer(line: string, handler: ControlHandler): Promise<ControlReply> {
  let request: ControlRequest | undefined;
  try {
    request = JSON.parse(line) as ControlRequest;
  } catch {
    // answered below
  }
  if (typeof request?.cmd !== 'string') return { ok: false, error: errorToWire(new InvalidArgumentError('malformed control request')) };
  try {
    return { ok: true, ...(await handler(request)) };
  } catch (err) {
    return { ok: false, error: errorToWire(err) };
  }
}

/**
 * Sends one request and waits for its answer. An error answer is thrown as the daemon's error
 * class (errorFromCode); NotAttachedError when nobody listens, DaemonError when the daemon closes
 * the connection without answering, DaemonTimeoutError after `timeoutMs`.
 */
export async function controlRequest(path: string, request: ControlRequest, timeoutMs = 120_000): Promise<Record<string, unknown>> {
  const reply = await new Promise<ControlReply>((resolve, reject) => {
    const socket = net.connect(path);
    let buffered = '';
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new DaemonTimeoutError(`no answer from the daemon at ${path}`));
    }, timeoutMs);
    socket.setEncoding('utf8');
    socket.on('connect', () => socket.write(JSON.stringify(request) + '\n'));
    socket.on('data', (chunk: string) => {
      buffered += chunk;
      const nl = buffered.indexOf('\n');
      if (nl < 0) return;
      clearTimeout(timer);
      socket.end();
      try {
        resolve(JSON.parse(buffered.slice(0, nl)) as ControlReply);
      } catch {
        reject(new ControlProtocolError(`malformed answer from the daemon at ${path}`));
      }
    });
    socket.on('close', () => {
      // A daemon that dies mid-request closes the socket without an answer: say so now rather
      // than at the timeout (a flush --wait may have a timeout of hours).
      clearTimeout(timer);
      reject(new DaemonError(`the daemon at ${path} closed the connection without answering (did it exit? see its log)`));
    });
    socket.on('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      if (err.code === 'ENOENT' || err.code === 'ECONNREFUSED') reject(new NotAttachedError(`no ulobdev daemon is listening on ${path}`));
      else if (err.code === 'EACCES' || err.code === 'EPERM') reject(new PermissionDeniedError(`cannot reach the daemon at ${path}: ${err.code} (run as root)`, { cause: err }));
      else reject(new IOFailedError(`cannot reach the daemon at ${path}: ${err.code ?? err.message}`, { cause: err, path }));
    });
  });
  if (!reply.ok) throw errorFromCode(reply.error.code, reply.error.message);
  const { ok: _ok, ...rest } = reply;
  return rest;
}

/** Refuses when a live daemon answers on `path`. */
export async function assertNoDaemon(path: string): Promise<void> {
  const st = await fsp.lstat(path).catch(() => null);
  if (!st) return;
  if (!st.isSocket()) throw new InvalidArgumentError(`${path} exists and is not a socket`);
  const alive = await new Promise<boolean>((resolve) => {
    const s = net.connect(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
  if (alive) throw new DeviceBusyError(`a ulobdev daemon is already running on ${path}`);
}

/** Removes a socket file nobody listens on (a daemon that crashed); refuses a live one. */
async function removeStaleSocket(path: string): Promise<void> {
  await assertNoDaemon(path);
  await fsp.rm(path, { force: true });
}
