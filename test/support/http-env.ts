// HTTP test environment: nginx started by the test with its own config, a tiny Node range server
// (also one that ignores ranges), a fault-injecting TCP proxy, and the ulohttp CLI runner.
// Every server listens on 127.0.0.1 only and is stopped by its PID / handle.
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import http from 'node:http';
import net from 'node:net';
import { dirname, join } from 'node:path';
import { ROOT, type CliResult } from './cli.js';

export const ULOHTTP = join(ROOT, 'dist/cli/ulohttp.js');

/** Runs ulohttp to completion (attach with --daemon returns once the device is ready). */
export function ulohttp(args: string[], options: { timeoutMs?: number } = {}): Promise<CliResult> {
  return new Promise((resolve) => {
    execFile(process.execPath, [ULOHTTP, ...args], { timeout: options.timeoutMs ?? 120_000, encoding: 'utf8' }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : 1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

export interface Nginx {
  port: number;
  root: string;
  accessLog: string;
  /** Access-log lines (method path status bytes range) since the start. */
  requests(): Array<{ path: string; status: number; bytes: number; range: string }>;
  stop(): Promise<void>;
}

/** Starts Debian's nginx on 127.0.0.1 serving `root`, with its config, pid and logs in `dir`. */
export async function startNginx(dir: string, root: string): Promise<Nginx> {
  mkdirSync(dir, { recursive: true });
  const accessLog = join(dir, 'access.log');
  const port = await freePort();
  const conf = join(dir, 'nginx.conf');
  writeFileSync(
    conf,
    `daemon off;
${process.getuid?.() === 0 ? 'user root root; # the scratch dirs are 0700' : ''}
worker_processes 1;
pid ${join(dir, 'nginx.pid')};
error_log ${join(dir, 'error.log')} warn;
events { worker_connections 256; }
http {
  access_log off;
  log_format ranges '$request_method $uri $status $body_bytes_sent "$http_range"';
  client_body_temp_path ${dir}/body; proxy_temp_path ${dir}/proxy; fastcgi_temp_path ${dir}/fastcgi;
  uwsgi_temp_path ${dir}/uwsgi; scgi_temp_path ${dir}/scgi;
  keepalive_requests 100000;
  server {
    listen 127.0.0.1:${port};
    root ${root};
    access_log ${accessLog} ranges;
    location / { }
  }
}
`,
  );
  const child = spawn('nginx', ['-c', conf, '-p', dir], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (c: Buffer) => (stderr += c.toString()));
  await waitForPort(port, child, () => stderr);
  return {
    port,
    root,
    accessLog,
    requests: () => parseAccessLog(accessLog),
    stop: () => stopChild(child),
  };
}

function parseAccessLog(path: string): Array<{ path: string; status: number; bytes: number; range: string }> {
  if (!existsSync(path)) return [];
  return readFileSync(path, 'utf8')
    .split('\n')
    .filter(Boolean)
    .map((line) => {
      const m = /^(\S+) (\S+) (\d+) (\d+) "(.*)"$/.exec(line);
      return m ? { path: m[2]!, status: Number(m[3]), bytes: Number(m[4]), range: m[5]! } : { path: '', status: 0, bytes: 0, range: '' };
    });
}

export interface RangeServerOptions {
  /** Answer 200 with the whole body to every request, as a server without range support does. */
  noRanges?: boolean;
  /** Send ETag (default) or only Last-Modified. */
  validator?: 'etag' | 'last-modified' | 'none';
  /** Called before each request is answered; may answer itself (return true) to inject a fault. */
  intercept?: (req: http.IncomingMessage, res: http.ServerResponse, n: number) => boolean | Promise<boolean>;
}

export interface RangeServer {
  url: string;
  port: number;
  /** Replaces the served image (a new version: new ETag and Last-Modified). */
  setData(data: Buffer): void;
  requests: number;
  bytesSent: number;
  stop(): Promise<void>;
}

/** A small Node HTTP server for one image at /disk.img, with Range, If-Match and If-Range. */
export async function startRangeServer(initial: Buffer, options: RangeServerOptions = {}): Promise<RangeServer> {
  let data = initial;
  let version = 1;
  let modified = new Date(Date.UTC(2024, 0, 1));
  let tag = '';
  const etag = () => (tag ||= `"v${version}-${createHash('sha1').update(data).digest('hex').slice(0, 12)}"`);
  const state = { requests: 0, bytesSent: 0 };
  const sockets = new Set<net.Socket>();
  const server = http.createServer(async (req, res) => {
    const n = state.requests++;
    if (options.intercept && (await options.intercept(req, res, n))) return;
    const validator = options.validator ?? 'etag';
    if (validator === 'etag') res.setHeader('ETag', etag());
    if (validator !== 'none') res.setHeader('Last-Modified', modified.toUTCString());
    const ifMatch = req.headers['if-match'];
    if (ifMatch && validator === 'etag' && ifMatch !== etag()) {
      res.writeHead(412).end();
      return;
    }
    const range = /^bytes=(\d+)-(\d+)$/.exec(String(req.headers.range ?? ''));
    const ifRange = req.headers['if-range'];
    const rangeOk = range && !options.noRanges && (!ifRange || ifRange === etag() || ifRange === modified.toUTCString());
    if (!rangeOk) {
      res.writeHead(200, { 'Content-Length': data.length });
      state.bytesSent += data.length;
      res.end(req.method === 'HEAD' ? undefined : data);
      return;
    }
    const start = Number(range[1]);
    const end = Math.min(Number(range[2]), data.length - 1);
    if (start >= data.length) {
      res.writeHead(416, { 'Content-Range': `bytes */${data.length}` }).end();
      return;
    }
    res.writeHead(206, { 'Content-Range': `bytes ${start}-${end}/${data.length}`, 'Content-Length': end - start + 1 });
    state.bytesSent += end - start + 1;
    res.end(data.subarray(start, end + 1));
  });
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as net.AddressInfo).port;
  return {
    url: `http://127.0.0.1:${port}/disk.img`,
    port,
    setData(next: Buffer) {
      data = next;
      version++;
      tag = '';
      modified = new Date(modified.getTime() + 60_000);
    },
    get requests() {
      return state.requests;
    },
    get bytesSent() {
      return state.bytesSent;
    },
    stop: () =>
      new Promise<void>((r) => {
        for (const s of sockets) s.destroy();
        server.close(() => r());
      }),
  };
}

export type Fault = 'pass' | 'drop' | 'stall' | 'http500' | 'truncate';

export interface FaultProxy {
  port: number;
  /** Connections seen so far, by the fault they got. */
  counts(): Record<Fault, number>;
  stop(): Promise<void>;
}

/**
 * Starts test/support/fault-proxy.mjs (its own process, so a test blocked in spawnSync does not
 * stall it) in front of `targetPort`: connection 0 and every `passEvery`-th pass, the others cycle
 * through drop, stall, 500 and a truncated answer.
 */
export async function startFaultProxy(targetPort: number, passEvery: number): Promise<FaultProxy> {
  const countsFile = join(mkdtempSync(join(tmpdir(), 'ulob-fault-')), 'counts.json');
  const child = spawn(process.execPath, [join(ROOT, 'test/support/fault-proxy.mjs'), String(targetPort), String(passEvery), countsFile], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const port = await new Promise<number>((resolve, reject) => {
    child.stdout!.once('data', (c: Buffer) => resolve(Number(c.toString().trim())));
    child.once('exit', (code) => reject(new Error(`fault proxy exited with ${code}`)));
  });
  return {
    port,
    counts: () => (existsSync(countsFile) ? JSON.parse(readFileSync(countsFile, 'utf8')) : { pass: 0, drop: 0, stall: 0, http500: 0, truncate: 0 }),
    stop: async () => {
      await stopChild(child);
      rmSync(dirname(countsFile), { recursive: true, force: true });
    },
  };
}

export async function freePort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as net.AddressInfo).port;
  await new Promise<void>((r) => srv.close(() => r()));
  return port;
}

async function waitForPort(port: number, child: ChildProcess, stderr: () => string): Promise<void> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`nginx exited with ${child.exitCode}: ${stderr()}`);
    const ok = await new Promise<boolean>((r) => {
      const s = net.connect(port, '127.0.0.1', () => {
        s.destroy();
        r(true);
      });
      s.on('error', () => r(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`nginx did not listen on ${port}: ${stderr()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.pid === undefined) return Promise.resolve();
  return new Promise((r) => {
    child.once('exit', () => r());
    process.kill(child.pid!, 'SIGTERM');
    setTimeout(() => child.exitCode === null && process.kill(child.pid!, 'SIGKILL'), 5000).unref();
  });
}
