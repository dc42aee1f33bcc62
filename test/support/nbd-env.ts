// Helpers for the NBD tests: the Debian tools they drive (installed on demand), temp dirs, child
// processes killed by PID when a test ends, backends (in-memory, and a real CacheEngine over a
// backing file), and a raw protocol client for what real clients never send.
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Writable } from 'node:stream';
import { pino, type Logger } from 'pino';
import type { BlockBackend } from '../../src/bdev/backend.js';
import {
  decodeGreeting,
  decodeOptionReply,
  decodeReply,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  encodeRequest,
  type OptionReply,
  type Reply,
} from '../../src/bdev/nbd-server/client-codec.js';
import {
  ByteQueue,
  ClientFlag,
  Info,
  Opt,
  Rep,
  BASE_ALLOCATION,
  type NbdRequest,
} from '../../src/bdev/nbd-server/protocol.js';
import { CacheEngine } from '../../src/cache/engine.js';
import { CacheStore } from '../../src/cache/store.js';
import type { CacheMode } from '../../src/cache/metadata.js';
import { openBacking } from '../../src/source/backing.js';

export const REPO = fileURLToPath(new URL('../..', import.meta.url));

/** Installs the Debian packages the tests drive, if any command is missing (quick when none is). */
export function ensureTestDeps(): void {
  execFileSync('bash', [join(REPO, 'scripts/install-test-deps.sh')], { stdio: ['ignore', 'inherit', 'inherit'], timeout: 900_000 });
}

// --- temp dirs and child processes -------------------------------------------------------------

const dirs: string[] = [];

export function tempDir(prefix: string): string {
  const dir = mkdtempSync(join(tmpdir(), `ulobdev-${prefix}-`));
  dirs.push(dir);
  return dir;
}

export function removeTempDirs(): void {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
}

const children = new Set<ChildProcess>();

export interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/**
 * Runs a command without blocking the event loop (the server under test runs in this process).
 * It is killed by PID on timeout, or by killChildren() when the test file ends.
 */
export function run(cmd: string, args: string[], options: { timeoutMs?: number } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    children.add(child);
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (c: Buffer) => (stdout += c.toString()));
    child.stderr!.on('data', (c: Buffer) => (stderr += c.toString()));
    const timer = setTimeout(() => {
      stderr += `\n[killed after ${options.timeoutMs ?? 30_000} ms]`;
      if (child.pid !== undefined) process.kill(child.pid, 'SIGKILL');
    }, options.timeoutMs ?? 30_000);
    child.on('error', (err) => {
      clearTimeout(timer);
      children.delete(child);
      reject(err);
    });
    child.on('close', (code) => {
      clearTimeout(timer);
      children.delete(child);
      resolve({ code, stdout, stderr });
    });
  });
}

/** Runs a command that must succeed; returns its stdout. */
export async function runOk(cmd: string, args: string[], options: { timeoutMs?: number } = {}): Promise<string> {
  const r = await run(cmd, args, options);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited with ${r.code}:\n${r.stderr}${r.stdout}`);
  return r.stdout;
}

export function killChildren(): void {
  for (const child of children) {
    if (child.pid !== undefined && child.exitCode === null) {
      try {
        process.kill(child.pid, 'SIGKILL');
      } catch {
        // already gone
      }
    }
  }
  children.clear();
}

// --- logging -----------------------------------------------------------------------------------

export interface LogEntry {
  level: number;
  msg: string;
  reason?: string;
  [key: string]: unknown;
}

/** A pino logger whose records land in `entries`, for asserting what the server logged. */
export function captureLogger(): { logger: Logger; entries: LogEntry[] } {
  const entries: LogEntry[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const line of chunk.toString().split('\n')) if (line) entries.push(JSON.parse(line) as LogEntry);
      cb();
    },
  });
  return { logger: pino({ level: 'debug' }, sink), entries };
}

// --- backends ----------------------------------------------------------------------------------

/** An in-memory BlockBackend that counts calls and can hold requests at a gate. */
export class MemoryBackend implements BlockBackend {
  readonly data: Buffer;
  readOnly: boolean;
  reads = 0;
  writes = 0;
  flushes = 0;
  discards = 0;
  active = 0;
  maxActive = 0;
  /** When set, every call waits for it before touching the data. */
  gate: Promise<void> | null = null;
  /** When set, calls throw what it returns (for error-mapping tests). */
  fail: ((op: string, offset: number) => Error | undefined) | null = null;

  constructor(size: number, options: { readOnly?: boolean; fill?: (i: number) => number } = {}) {
    this.data = Buffer.alloc(size);
    if (options.fill) for (let i = 0; i < size; i++) this.data[i] = options.fill(i);
    this.readOnly = options.readOnly ?? false;
  }

  get size(): number {
    return this.data.byteLength;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    this.reads++;
    return this.#op('read', offset, () => Buffer.from(this.data.subarray(offset, offset + length)));
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    this.writes++;
    return this.#op('write', offset, () => void this.data.set(data, offset));
  }

  async flush(): Promise<void> {
    this.flushes++;
    return this.#op('flush', 0, () => undefined);
  }

  async discard(offset: number): Promise<void> {
    this.discards++;
    return this.#op('discard', offset, () => undefined);
  }

  async #op<T>(op: string, offset: number, fn: () => T): Promise<T> {
    this.active++;
    this.maxActive = Math.max(this.maxActive, this.active);
    try {
      if (this.gate) await this.gate;
      const err = this.fail?.(op, offset);
      if (err) throw err;
      return fn();
    } finally {
      this.active--;
    }
  }
}

/** A gate: `promise` resolves when `open()` is called. */
export function gate(): { promise: Promise<void>; open: () => void } {
  let open!: () => void;
  const promise = new Promise<void>((resolve) => (open = resolve));
  return { promise, open };
}

export interface EngineFixture {
  engine: CacheEngine;
  backingPath: string;
  size: number;
  close(): Promise<void>;
}

/** A real CacheEngine (posix storage, SQLite metadata) over a backing file of random bytes. */
export async function openEngineFixture(dir: string, size: number, mode: CacheMode = 'writeback'): Promise<EngineFixture> {
  const backingPath = join(dir, 'backing.img');
  writeFileSync(backingPath, randomBytes(size));
  const source = await openBacking(backingPath, { writable: mode === 'writeback' });
  const store = await CacheStore.open({
    paths: { cache: join(dir, 'cache.img'), bitmap: join(dir, 'cache.bitmap'), metadata: join(dir, 'cache.db') },
    backing: source,
    mode,
  });
  const engine = new CacheEngine(store, source);
  return {
    engine,
    backingPath,
    size,
    async close() {
      await engine.close();
      await source.close();
    },
  };
}

export function sha256(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

export function nbdUrl(socketPath: string): string {
  return `nbd+unix:///?socket=${socketPath}`;
}

// --- raw protocol client -----------------------------------------------------------------------

export interface HandshakeOptions {
  structured?: boolean;
  metaContext?: boolean;
  name?: string;
  noZeroes?: boolean;
}

/** Speaks NBD byte by byte, for requests and sequences real clients do not send. */
export class RawClient {
  readonly socket: net.Socket;
  readonly queue = new ByteQueue();
  #ended = false;
  #wake: (() => void)[] = [];

  private constructor(socket: net.Socket) {
    this.socket = socket;
    socket.on('data', (c: Buffer) => {
      this.queue.push(c);
      this.#notify();
    });
    socket.on('close', () => {
      this.#ended = true;
      this.#notify();
    });
    socket.on('error', () => undefined);
  }

  static connect(path: string): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const socket = net.connect(path);
      socket.once('connect', () => resolve(new RawClient(socket)));
      socket.once('error', reject);
    });
  }

  get ended(): boolean {
    return this.#ended;
  }

  send(bytes: Uint8Array): void {
    if (!this.socket.destroyed) this.socket.write(bytes);
  }

  /** Waits until `decode` finds a whole message at the front of the queue. */
  async next<T>(decode: (q: ByteQueue) => T | null, timeoutMs = 5000): Promise<T> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const v = decode(this.queue);
      if (v !== null) return v;
      if (this.#ended) throw new Error(`connection closed with ${this.queue.length} bytes unparsed`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no complete message within ${timeoutMs} ms (${this.queue.length} bytes queued)`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.#wake.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  bytes(n: number, timeoutMs?: number): Promise<Buffer> {
    return this.next((q) => (q.length >= n ? q.take(n) : null), timeoutMs);
  }

  /** True if the server closes the connection within the time. */
  async closedWithin(timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (!this.#ended && Date.now() < deadline) {
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, deadline - Date.now());
        this.#wake.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
    return this.#ended;
  }

  /** Reads the greeting and sends client flags. */
  async greet(flags = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES): Promise<number> {
    const g = await this.next(decodeGreeting);
    const b = Buffer.alloc(4);
    b.writeUInt32BE(flags, 0);
    this.send(b);
    return g.handshakeFlags;
  }

  /** Sends an option and collects its replies up to the final ACK or error. */
  async option(option: number, data?: Uint8Array): Promise<OptionReply[]> {
    this.send(encodeOption(option, data));
    const replies: OptionReply[] = [];
    for (;;) {
      const r = await this.next(decodeOptionReply);
      replies.push(r);
      if (r.type === Rep.ACK || r.type >= 0x80000000) return replies;
    }
  }

  /** Greeting, options and NBD_OPT_GO; returns the export size and transmission flags. */
  async handshake(options: HandshakeOptions = {}): Promise<{ size: number; flags: number }> {
    await this.greet();
    if (options.structured ?? true) await this.option(Opt.STRUCTURED_REPLY);
    if (options.metaContext) await this.option(Opt.SET_META_CONTEXT, encodeMetaContextRequest(options.name ?? '', [BASE_ALLOCATION]));
    const replies = await this.option(Opt.GO, encodeInfoRequest(options.name ?? '', [Info.BLOCK_SIZE]));
    const last = replies[replies.length - 1]!;
    if (last.type !== Rep.ACK) throw new Error(`NBD_OPT_GO failed: reply 0x${last.type.toString(16)} ${last.data.toString()}`);
    const info = replies.find((r) => r.type === Rep.INFO && r.data.readUInt16BE(0) === Info.EXPORT)!;
    return { size: Number(info.data.readBigUInt64BE(2)), flags: info.data.readUInt16BE(10) };
  }

  request(req: Partial<NbdRequest> & { type: number; handle: bigint }): void {
    this.send(encodeRequest({ flags: 0, offset: 0n, length: req.data?.byteLength ?? 0, ...req }));
  }

  reply(timeoutMs?: number): Promise<Reply> {
    return this.next(decodeReply, timeoutMs);
  }

  close(): void {
    this.socket.destroy();
  }

  #notify(): void {
    for (const w of this.#wake.splice(0)) w();
  }
}
