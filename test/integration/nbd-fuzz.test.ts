// Hostile and broken clients: garbage handshakes, wrong magics, huge lengths, truncated requests,
// random bytes and random requests after a valid handshake, connections dropped at every stage.
// The server must close only the offending connection, log why, stay up for real clients, and
// leave the data alone.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { NbdServer } from '../../src/bdev/nbd-server/index.js';
import {
  encodeInfoRequest,
  encodeOption,
  encodeRequest,
  type Reply,
} from '../../src/bdev/nbd-server/client-codec.js';
import {
  ClientFlag,
  Cmd,
  Errno,
  Opt,
  REQUEST_MAGIC,
} from '../../src/bdev/nbd-server/protocol.js';
import {
  MemoryBackend,
  RawClient,
  captureLogger,
  ensureTestDeps,
  killChildren,
  openEngineFixture,
  removeTempDirs,
  run,
  runOk,
  sha256,
  tempDir,
  type EngineFixture,
  type LogEntry,
} from '../support/nbd-env.js';

const MiB = 1 << 20;
const size = 4 * MiB;

let dir: string;
let fx: EngineFixture;
let server: NbdServer;
let sock: string;
let logs: LogEntry[];
let backingHash: string;
let original: Buffer;

/** A second server over a read-only in-memory disk, where any request may be sent. */
let roServer: NbdServer;
let roSock: string;
let roDisk: MemoryBackend;
let roOriginal: Buffer;

beforeAll(async () => {
  ensureTestDeps();
  dir = tempDir('nbd-fuzz');
  fx = await openEngineFixture(dir, size);
  original = readFileSync(fx.backingPath);
  backingHash = sha256(fx.backingPath);
  const captured = captureLogger();
  logs = captured.entries;
  sock = join(dir, 'nbd.sock');
  server = new NbdServer({ backend: fx.engine, logger: captured.logger, maxPayload: MiB });
  await server.listen({ path: sock });

  roDisk = new MemoryBackend(MiB, { readOnly: true, fill: (i) => (i * 13 + 5) & 0xff });
  roOriginal = Buffer.from(roDisk.data);
  roSock = join(dir, 'ro.sock');
  roServer = new NbdServer({ backend: roDisk, maxPayload: 64 * 1024 });
  await roServer.listen({ path: roSock });
}, 900_000);

afterAll(async () => {
  await server?.close();
  await roServer?.close();
  await fx?.close();
  killChildren();
  removeTempDirs();
});

const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));

/** Sends `bytes` in the given pieces, letting the event loop run between them. */
async function sendInPieces(c: RawClient, bytes: Buffer, cuts: number[]): Promise<void> {
  const points = [...new Set(cuts.map((x) => x % (bytes.byteLength + 1)))].sort((a, b) => a - b);
  let prev = 0;
  for (const p of [...points, bytes.byteLength]) {
    c.send(bytes.subarray(prev, p));
    prev = p;
    await tick();
  }
}

async function waitFor(cond: () => boolean, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await tick(10);
  }
}

function warnedSince(mark: number, pattern: RegExp): boolean {
  return logs.slice(mark).some((e) => e.level === 40 && typeof e.reason === 'string' && pattern.test(e.reason));
}

/** A valid client still gets correct data from the export. */
async function expectServing(path: string, expected: Buffer, offset = 0, length = 4096): Promise<void> {
  const c = await RawClient.connect(path);
  try {
    await c.handshake();
    c.request({ type: Cmd.READ, handle: 42n, offset: BigInt(offset), length });
    const r = await c.reply();
    expect(r.kind === 'chunk' && r.payload.subarray(8).equals(expected.subarray(offset, offset + length))).toBe(true);
  } finally {
    c.close();
  }
}

describe('hostile handshakes', () => {
  it('survives garbage from the first byte, in any chunking', async () => {
    await fc.assert(
      fc.asyncProperty(fc.uint8Array({ maxLength: 400 }), fc.array(fc.nat(), { maxLength: 6 }), async (bytes, cuts) => {
        const c = await RawClient.connect(sock);
        await sendInPieces(c, Buffer.from(bytes), cuts);
        await tick(2);
        c.close();
      }),
      { numRuns: 150 },
    );
    await expectServing(sock, original);
  });

  it('closes on unknown client flags and on a wrong option magic, and says why', async () => {
    const mark = logs.length;
    const a = await RawClient.connect(sock);
    await a.greet(0x80 | ClientFlag.FIXED_NEWSTYLE);
    expect(await a.closedWithin(2000)).toBe(true);

    await fc.assert(
      fc.asyncProperty(fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }), async (magic) => {
        fc.pre(magic !== 0x49484156454f5054n);
        const c = await RawClient.connect(sock);
        await c.greet();
        const opt = encodeOption(Opt.GO, encodeInfoRequest('', []));
        opt.writeBigUInt64BE(magic, 0);
        c.send(opt);
        expect(await c.closedWithin(2000)).toBe(true);
      }),
      { numRuns: 30 },
    );
    expect(warnedSince(mark, /unknown client flags/)).toBe(true);
    expect(warnedSince(mark, /bad option magic/)).toBe(true);
  });

  it('closes on an option that claims a huge length, without waiting for its data', async () => {
    const mark = logs.length;
    const c = await RawClient.connect(sock);
    await c.greet();
    const header = encodeOption(Opt.INFO).subarray(0, 16);
    header.writeUInt32BE(0xffffffff, 12);
    c.send(header);
    expect(await c.closedWithin(2000)).toBe(true);
    expect(warnedSince(mark, /4294967295 bytes of data/)).toBe(true);
  });

  it('answers random options with a reply or a close, never a crash', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.record({ option: fc.oneof(fc.nat({ max: 12 }), fc.nat({ max: 0xffffffff })), data: fc.uint8Array({ maxLength: 64 }) }), { maxLength: 6 }),
        async (options) => {
          const c = await RawClient.connect(sock);
          await c.greet();
          for (const o of options) c.send(encodeOption(o.option, o.data));
          await tick(5);
          c.close();
        },
      ),
      { numRuns: 100 },
    );
    await expectServing(sock, original);
  });

  it('cuts a client that keeps sending options forever', async () => {
    const mark = logs.length;
    const c = await RawClient.connect(sock);
    await c.greet();
    const many = Buffer.concat(Array.from({ length: 1100 }, () => encodeOption(12345)));
    c.send(many);
    expect(await c.closedWithin(3000)).toBe(true);
    expect(warnedSince(mark, /more than 1024 options/)).toBe(true);
  });
});

describe('hostile transmission', () => {
  it('closes on a write longer than the maximum payload; answers a huge read with EINVAL', async () => {
    const mark = logs.length;
    const c = await RawClient.connect(sock);
    await c.handshake();
    c.request({ type: Cmd.READ, handle: 1n, offset: 0n, length: 0xffffffff });
    const r = await c.reply();
    expect(r.kind === 'chunk' && r.payload.readUInt32BE(0)).toBe(Errno.EINVAL);
    const header = encodeRequest({ flags: 0, type: Cmd.WRITE, handle: 2n, offset: 0n, length: 0 });
    header.writeUInt32BE(0xffffffff, 24);
    c.send(header);
    expect(await c.closedWithin(2000)).toBe(true);
    expect(warnedSince(mark, /NBD_CMD_WRITE of 4294967295 bytes exceeds/)).toBe(true);
  });

  it('drops truncated requests and half-sent writes without writing anything', async () => {
    for (const cut of [1, 10, 27, 28, 28 + 100, 28 + 4095]) {
      const c = await RawClient.connect(sock);
      await c.handshake();
      const w = encodeRequest({ flags: 0, type: Cmd.WRITE, handle: 1n, offset: 0n, length: 4096, data: Buffer.alloc(4096, 0xee) });
      c.send(w.subarray(0, cut));
      await tick(5);
      c.close();
    }
    await waitFor(() => server.connections === 0);
    expect((await fx.engine.read(0, 4096)).equals(original.subarray(0, 4096))).toBe(true);
  });

  it('closes on random bytes after a valid handshake, and logs a bad magic', async () => {
    const mark = logs.length;
    await fc.assert(
      fc.asyncProperty(fc.uint8Array({ minLength: 28, maxLength: 600 }), fc.array(fc.nat(), { maxLength: 5 }), async (bytes, cuts) => {
        const b = Buffer.from(bytes);
        fc.pre(b.readUInt32BE(0) !== REQUEST_MAGIC);
        const c = await RawClient.connect(sock);
        await c.handshake({ structured: bytes[0]! % 2 === 0 });
        await sendInPieces(c, b, cuts);
        expect(await c.closedWithin(2000)).toBe(true);
      }),
      { numRuns: 60 },
    );
    expect(warnedSince(mark, /bad request magic/)).toBe(true);
    await expectServing(sock, original);
  });

  it('answers every well-framed random request on a read-only export, or closes on an oversized write', async () => {
    const arbReq = fc.record({
      type: fc.oneof(fc.constantFrom(Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES, Cmd.BLOCK_STATUS), fc.nat({ max: 0xffff })),
      flags: fc.oneof(fc.constant(0), fc.nat({ max: 31 }), fc.nat({ max: 0xffff })),
      offset: fc.oneof(fc.nat({ max: MiB }).map(BigInt), fc.bigInt({ min: 0n, max: 2n ** 64n - 1n })),
      length: fc.oneof(fc.nat({ max: 8192 }), fc.nat({ max: 0xffffffff })),
    });
    await fc.assert(
      fc.asyncProperty(fc.array(arbReq, { minLength: 1, maxLength: 12 }), fc.boolean(), fc.boolean(), async (reqs, structured, metaContext) => {
        const c = await RawClient.connect(roSock);
        try {
          await c.handshake({ structured, metaContext: structured && metaContext });
          let expected = 0;
          let oversized = false;
          for (const [i, r] of reqs.entries()) {
            if (r.type === Cmd.DISC) continue;
            if (r.type === Cmd.WRITE) {
              if (r.length > 64 * 1024) {
                c.send(encodeRequest({ ...r, handle: BigInt(i), length: r.length }));
                oversized = true;
                break;
              }
              c.send(encodeRequest({ ...r, handle: BigInt(i), data: Buffer.alloc(r.length, 0xee) }));
            } else {
              c.send(encodeRequest({ ...r, handle: BigInt(i) }));
            }
            expected++;
          }
          if (oversized) {
            expect(await c.closedWithin(2000)).toBe(true);
            return;
          }
          const seen = new Set<bigint>();
          for (let k = 0; k < expected; k++) {
            const rep: Reply = await c.reply();
            if (rep.kind === 'simple' && rep.error === 0) {
              const req = reqs[Number(rep.handle)]!;
              if (req.type === Cmd.READ) await c.bytes(req.length);
            }
            seen.add(rep.handle);
          }
          expect(seen.size).toBe(expected);
          expect(c.ended).toBe(false);
        } finally {
          c.close();
        }
      }),
      { numRuns: 120 },
    );
    expect(roDisk.writes).toBe(0);
    expect(roDisk.discards).toBe(0);
    expect(roDisk.data.equals(roOriginal)).toBe(true);
    await expectServing(roSock, roOriginal, 4096, 8192);
  });
});

describe('connection churn', () => {
  it('survives many connections opened and dropped at every stage', async () => {
    const jobs: Promise<void>[] = [];
    for (let i = 0; i < 240; i++) {
      jobs.push(
        (async () => {
          const c = await RawClient.connect(sock);
          const stage = i % 4;
          if (stage === 1) await c.greet();
          if (stage === 2) c.send(Buffer.from([0, 0, 0, 3]).subarray(0, 2));
          if (stage === 3) {
            await c.handshake({ structured: i % 8 === 3 });
            for (let k = 0; k < 8; k++) c.request({ type: Cmd.READ, handle: BigInt(k), offset: BigInt(k * 65536), length: 65536 });
            c.request({ type: Cmd.FLUSH, handle: 99n });
          }
          c.close();
        })(),
      );
    }
    await Promise.all(jobs);
    await waitFor(() => server.connections === 0, 10_000);
  });

  it('still serves real clients, and neither the export nor the disk changed', async () => {
    const url = server.url!;
    expect((await runOk('nbdinfo', ['--size', url])).trim()).toBe(String(size));
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', url, fx.backingPath]);
    expect(cmp.code, cmp.stderr).toBe(0);
    expect((await fx.engine.read(0, size)).equals(original)).toBe(true);
    expect(sha256(fx.backingPath)).toBe(backingHash);
    expect(fx.engine.stats().dirtyBlocks).toBe(0);
    // Everything logged at warn level or above was a protocol violation with a reason.
    for (const e of logs.filter((l) => l.level >= 40)) expect(e.msg).toMatch(/protocol violation/);
  });
});
