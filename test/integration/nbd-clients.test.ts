// The NBD server against real clients (qemu-img, qemu-io, nbdinfo, nbdcopy) over a real
// CacheEngine, and against a raw protocol client for ordering, errors and backpressure.
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { lstatSync, readFileSync, writeFileSync } from 'node:fs';
import * as net from 'node:net';
import { join } from 'node:path';
import { NbdServer } from '../../src/bdev/nbd-server/index.js';
import { Connection } from '../../src/bdev/nbd-server/connection.js';
import { exportConfig } from '../../src/bdev/nbd-server/export.js';
import {
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  encodeRequest,
  decodeOptionReply,
  type Reply,
} from '../../src/bdev/nbd-server/client-codec.js';
import {
  Cmd,
  CmdFlag,
  Errno,
  Info,
  Opt,
  Rep,
  ReplyFlag,
  ReplyType,
  TxFlag,
  BASE_ALLOCATION,
} from '../../src/bdev/nbd-server/protocol.js';
import { IOFailedError, ReadOnlyError } from '../../src/errors.js';
import {
  MemoryBackend,
  captureLogger,
  RawClient,
  ensureTestDeps,
  gate,
  killChildren,
  nbdUrl,
  openEngineFixture,
  removeTempDirs,
  run,
  runOk,
  sha256,
  tempDir,
  type EngineFixture,
} from '../support/nbd-env.js';

const MiB = 1 << 20;
const KiB = 1024;

beforeAll(() => ensureTestDeps(), 900_000);

afterAll(() => {
  killChildren();
  removeTempDirs();
});

/** Error value of a reply (simple or structured error chunk), 0 for success. */
function errorOf(r: Reply): number {
  if (r.kind === 'simple') return r.error;
  return r.type & 0x8000 ? r.payload.readUInt32BE(0) : 0;
}

describe('real clients over a CacheEngine (write-back)', () => {
  const size = 8 * MiB;
  let dir: string;
  let fx: EngineFixture;
  let server: NbdServer;
  let url: string;
  let original: Buffer;

  beforeAll(async () => {
    dir = tempDir('nbd-clients');
    fx = await openEngineFixture(dir, size);
    original = readFileSync(fx.backingPath);
    server = new NbdServer({ backend: fx.engine, description: 'test disk' });
    await server.listen({ path: join(dir, 'nbd.sock') });
    url = server.url!;
  });

  afterAll(async () => {
    await server?.close();
    await fx?.close();
  });

  it('creates the socket 0600 and gives it out as an nbd+unix URL', () => {
    const st = lstatSync(join(dir, 'nbd.sock'));
    expect(st.isSocket()).toBe(true);
    expect(st.mode & 0o777).toBe(0o600);
    expect(url).toBe(nbdUrl(join(dir, 'nbd.sock')));
  });

  it('qemu-img info reports the size', async () => {
    const info = JSON.parse(await runOk('qemu-img', ['info', '-f', 'raw', '--output=json', url])) as { 'virtual-size': number };
    expect(info['virtual-size']).toBe(size);
  });

  it('nbdinfo reports size, capabilities, block sizes and the allocation map', async () => {
    expect((await runOk('nbdinfo', ['--size', url])).trim()).toBe(String(size));
    for (const can of ['flush', 'fua', 'multi-conn', 'trim', 'zero', 'cache', 'df', 'write']) {
      expect((await run('nbdinfo', ['--can', can, url])).code, `--can ${can}`).toBe(0);
    }
    expect((await run('nbdinfo', ['--can', 'fast-zero', url])).code).toBe(2);
    expect((await run('nbdinfo', ['--is', 'read-only', url])).code).toBe(2);
    const json = JSON.parse(await runOk('nbdinfo', ['--json', url])) as { exports: Record<string, unknown>[] };
    const e = json.exports[0]!;
    expect(e).toMatchObject({
      'export-name': '',
      description: 'test disk',
      'export-size': size,
      block_size_minimum: 512,
      block_size_preferred: 4096,
      block_size_maximum: 32 * MiB,
    });
    expect(e['contexts']).toEqual([BASE_ALLOCATION]);
    const map = (await runOk('nbdinfo', ['--map', url])).trim().split(/\s+/);
    expect(map).toEqual(['0', String(size), '0', 'data']);
    const list = await runOk('nbdinfo', ['--list', '--json', url]);
    expect(JSON.parse(list).exports).toHaveLength(1);
  });

  it('qemu-img compare finds the export identical to the backing file', async () => {
    const r = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', url, fx.backingPath]);
    expect(r.code, r.stderr).toBe(0);
  });

  it('qemu-img convert copies the export out byte for byte', async () => {
    const out = join(dir, 'convert.img');
    await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', url, out]);
    expect(readFileSync(out).equals(original)).toBe(true);
  });

  it('nbdcopy copies the export out over several connections', async () => {
    const out = join(dir, 'nbdcopy-out.img');
    await runOk('nbdcopy', ['--connections=4', '--requests=32', url, out]);
    expect(readFileSync(out).equals(original)).toBe(true);
  });

  it('qemu-io writes, reads back and flushes; the data lands in the cache, not the disk', async () => {
    await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0xab 0 64k', '-c', 'read -P 0xab 0 64k', '-c', 'flush', url]);
    expect((await fx.engine.read(0, 64 * KiB)).equals(Buffer.alloc(64 * KiB, 0xab))).toBe(true);
    expect(readFileSync(fx.backingPath).subarray(0, 64 * KiB).equals(original.subarray(0, 64 * KiB))).toBe(true);
    expect(fx.engine.stats().dirtyBlocks).toBe(16);
    const r = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', url, fx.backingPath]);
    expect(r.code).toBe(1);
  });

  it('qemu-io write-zeroes with FUA, discard and unaligned writes read back right', async () => {
    await runOk('qemu-io', [
      '-f', 'raw',
      '-c', 'write -P 0x11 1m 256k',
      '-c', 'write -z -f 1m 128k',
      '-c', 'read -P 0 1m 128k',
      '-c', 'read -P 0x11 1152k 128k',
      '-c', 'write -f -P 0x22 2m 4k',
      '-c', 'discard 3m 64k',
      '-c', 'read -P 0 3m 64k',
      url,
    ]);
    expect((await fx.engine.read(MiB, 128 * KiB)).equals(Buffer.alloc(128 * KiB))).toBe(true);
    expect((await fx.engine.read(2 * MiB, 4 * KiB)).equals(Buffer.alloc(4 * KiB, 0x22))).toBe(true);
    // A discard zeroes (issue 14, item 4a): the range reads zeros, and takes no cache space.
    expect((await fx.engine.read(3 * MiB, 64 * KiB)).equals(Buffer.alloc(64 * KiB))).toBe(true);
    expect(original.subarray(3 * MiB, 3 * MiB + 64 * KiB).equals(Buffer.alloc(64 * KiB))).toBe(false);
  });

  it('nbdcopy writes a file into the export and reads it back out', async () => {
    const src = join(dir, 'in.img');
    const back = join(dir, 'back.img');
    const content = randomBytes(size);
    writeFileSync(src, content);
    await runOk('nbdcopy', ['--connections=4', src, url]);
    expect((await fx.engine.read(0, size)).equals(content)).toBe(true);
    await runOk('nbdcopy', [url, back]);
    expect(readFileSync(back).equals(content)).toBe(true);
    const r = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', url, src]);
    expect(r.code, r.stderr).toBe(0);
  });

  it('serves several clients at once', async () => {
    const jobs = [0, 1, 2, 3].map((i) =>
      runOk('qemu-io', ['-f', 'raw', '-c', `write -P ${0x40 + i} ${4 + i}m 512k`, '-c', `read -P ${0x40 + i} ${4 + i}m 512k`, '-c', 'flush', url]),
    );
    await Promise.all(jobs);
    for (let i = 0; i < 4; i++) {
      expect((await fx.engine.read((4 + i) * MiB, 512 * KiB)).equals(Buffer.alloc(512 * KiB, 0x40 + i)), `client ${i}`).toBe(true);
    }
  });

  it('serves over TCP on 127.0.0.1 when asked', async () => {
    const tcp = new NbdServer({ backend: fx.engine });
    await tcp.listen({ port: 0 });
    try {
      const a = tcp.address as { host: string; port: number };
      expect(a.host).toBe('127.0.0.1');
      expect(tcp.url).toBe(`nbd://127.0.0.1:${a.port}`);
      expect((await runOk('nbdinfo', ['--size', tcp.url!])).trim()).toBe(String(size));
    } finally {
      await tcp.close();
    }
  });
});

describe('read-only export over a CacheEngine', () => {
  const size = 2 * MiB;
  let dir: string;
  let fx: EngineFixture;
  let server: NbdServer;
  let url: string;
  let before: string;

  beforeAll(async () => {
    dir = tempDir('nbd-ro');
    fx = await openEngineFixture(dir, size, 'readonly');
    before = sha256(fx.backingPath);
    server = new NbdServer({ backend: fx.engine });
    await server.listen({ path: join(dir, 'nbd.sock') });
    url = server.url!;
  });

  afterAll(async () => {
    await server?.close();
    await fx?.close();
  });

  it('says it is read-only and cannot write, trim or zero', async () => {
    expect((await run('nbdinfo', ['--is', 'read-only', url])).code).toBe(0);
    for (const can of ['write', 'trim', 'zero', 'fua']) expect((await run('nbdinfo', ['--can', can, url])).code, can).toBe(2);
    expect((await run('nbdinfo', ['--can', 'flush', url])).code).toBe(0);
  });

  it('qemu-io cannot write; reads work', async () => {
    const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xcd 0 4k', url]);
    expect(w.code).not.toBe(0);
    const r = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', url, fx.backingPath]);
    expect(r.code, r.stderr).toBe(0);
  });

  it('answers writes, trims and write-zeroes that are sent anyway with EPERM', async () => {
    const c = await RawClient.connect(join(dir, 'nbd.sock'));
    try {
      const { flags } = await c.handshake();
      expect(flags & TxFlag.READ_ONLY).toBeTruthy();
      c.request({ type: Cmd.WRITE, handle: 1n, data: Buffer.alloc(4096, 0xee) });
      c.request({ type: Cmd.TRIM, handle: 2n, length: 4096 });
      c.request({ type: Cmd.WRITE_ZEROES, handle: 3n, length: 4096 });
      const replies = [await c.reply(), await c.reply(), await c.reply()];
      expect(replies.map(errorOf)).toEqual([Errno.EPERM, Errno.EPERM, Errno.EPERM]);
      c.request({ type: Cmd.READ, handle: 4n, length: 4096 });
      const r = await c.reply();
      expect(r.kind === 'chunk' && r.payload.subarray(8).equals(readFileSync(fx.backingPath).subarray(0, 4096))).toBe(true);
    } finally {
      c.close();
    }
    expect(sha256(fx.backingPath)).toBe(before);
  });
});

describe('protocol details with a raw client', () => {
  const size = 1 * MiB;
  let dir: string;
  let sock: string;
  let mem: MemoryBackend;
  let server: NbdServer;
  let clients: RawClient[] = [];

  beforeAll(() => {
    dir = tempDir('nbd-raw');
  });

  async function start(options: Partial<ConstructorParameters<typeof NbdServer>[0]> = {}): Promise<void> {
    mem = new MemoryBackend(size, { fill: (i) => (i * 7) & 0xff });
    sock = join(dir, `raw-${Math.random().toString(36).slice(2)}.sock`);
    server = new NbdServer({ backend: mem, ...options });
    await server.listen({ path: sock });
  }

  async function client(): Promise<RawClient> {
    const c = await RawClient.connect(sock);
    clients.push(c);
    return c;
  }

  let gates: (() => void)[] = [];

  /** A gate on the backend, opened at the latest when the test ends (so close() can drain). */
  function hold(): () => void {
    const g = gate();
    mem.gate = g.promise;
    const open = () => {
      mem.gate = null;
      g.open();
    };
    gates.push(open);
    return open;
  }

  afterEach(async () => {
    for (const open of gates) open();
    gates = [];
    for (const c of clients) c.close();
    clients = [];
    await server?.close();
  });

  it('replies out of order: a fast request overtakes a slow one', async () => {
    await start();
    const c = await client();
    await c.handshake();
    const open = hold();
    c.request({ type: Cmd.READ, handle: 1n, offset: 0n, length: 4096 });
    await new Promise((r) => setTimeout(r, 20));
    mem.gate = null;
    c.request({ type: Cmd.READ, handle: 2n, offset: 4096n, length: 4096 });
    const first = await c.reply();
    expect(first.handle).toBe(2n);
    open();
    const second = await c.reply();
    expect(second.handle).toBe(1n);
    expect(second.kind === 'chunk' && second.payload.subarray(8).equals(mem.data.subarray(0, 4096))).toBe(true);
  });

  it('answers a request beyond the export with an error and keeps the connection', async () => {
    await start();
    for (const structured of [true, false]) {
      const c = await client();
      await c.handshake({ structured });
      c.request({ type: Cmd.READ, handle: 7n, offset: BigInt(size - 512), length: 1024 });
      const r = await c.reply();
      expect(r.handle).toBe(7n);
      expect(errorOf(r)).toBe(Errno.EINVAL);
      if (structured) expect(r.kind === 'chunk' && r.type).toBe(ReplyType.ERROR);
      else expect(r.kind).toBe('simple');
      c.request({ type: Cmd.WRITE, handle: 8n, offset: BigInt(size), data: Buffer.alloc(512) });
      expect(errorOf(await c.reply())).toBe(Errno.ENOSPC);
      c.request({ type: Cmd.READ, handle: 9n, offset: BigInt(size - 512), length: 512 });
      const ok = await c.reply();
      expect([ok.handle, errorOf(ok)]).toEqual([9n, 0]);
      const data = ok.kind === 'simple' ? await c.bytes(512) : ok.payload.subarray(8);
      expect(data.equals(mem.data.subarray(size - 512))).toBe(true);
      expect(c.ended).toBe(false);
    }
  });

  it('answers reads over the maximum payload with EINVAL', async () => {
    await start({ maxPayload: 64 * KiB });
    const c = await client();
    await c.handshake();
    c.request({ type: Cmd.READ, handle: 1n, length: 64 * KiB + 1 });
    expect(errorOf(await c.reply())).toBe(Errno.EINVAL);
    c.request({ type: Cmd.READ, handle: 2n, length: 64 * KiB });
    expect(errorOf(await c.reply())).toBe(0);
  });

  it('executes write, FUA write, flush, trim, write-zeroes, cache and block status', async () => {
    await start();
    const c = await client();
    await c.handshake({ metaContext: true });
    c.request({ type: Cmd.WRITE, handle: 1n, offset: 4096n, data: Buffer.alloc(4096, 0x5a) });
    c.request({ type: Cmd.WRITE, handle: 2n, flags: CmdFlag.FUA, offset: 0n, data: Buffer.alloc(100, 0x01) });
    c.request({ type: Cmd.FLUSH, handle: 3n });
    c.request({ type: Cmd.TRIM, handle: 4n, offset: 8192n, length: 4096 });
    c.request({ type: Cmd.WRITE_ZEROES, handle: 5n, flags: CmdFlag.NO_HOLE | CmdFlag.FUA, offset: 65536n, length: 65536 });
    c.request({ type: Cmd.CACHE, handle: 6n, offset: 0n, length: size });
    c.request({ type: Cmd.BLOCK_STATUS, handle: 7n, flags: CmdFlag.REQ_ONE, offset: 512n, length: 10000 });
    const replies = new Map<bigint, Reply>();
    for (let i = 0; i < 7; i++) {
      const r = await c.reply();
      replies.set(r.handle, r);
    }
    for (const h of [1n, 2n, 3n, 4n, 5n, 6n, 7n]) expect(errorOf(replies.get(h)!), `handle ${h}`).toBe(0);
    expect(mem.data.subarray(4096, 8192).equals(Buffer.alloc(4096, 0x5a))).toBe(true);
    expect(mem.data.subarray(0, 100).equals(Buffer.alloc(100, 1))).toBe(true);
    expect(mem.data.subarray(65536, 131072).equals(Buffer.alloc(65536))).toBe(true);
    expect(mem.discards).toBe(1);
    expect(mem.flushes).toBe(2); // FLUSH, and the FUA of write-zeroes (a FUA write passes { fua } to the backend)
    const bs = replies.get(7n)!;
    expect(bs.kind === 'chunk' && [bs.type, bs.flags & ReplyFlag.DONE, bs.payload.readUInt32BE(0), bs.payload.readUInt32BE(4), bs.payload.readUInt32BE(8)]).toEqual([
      ReplyType.BLOCK_STATUS,
      ReplyFlag.DONE,
      1,
      10000,
      0,
    ]);
  });

  it('maps backend errors to NBD errors with a message', async () => {
    await start();
    const c = await client();
    await c.handshake();
    mem.fail = (op, offset) => {
      if (offset === 4096) return new ReadOnlyError('the cache is read-only');
      if (offset === 8192) return new IOFailedError('cannot write: ENOSPC', { cause: Object.assign(new Error('x'), { code: 'ENOSPC' }) });
      if (op === 'read' && offset === 12288) return new Error('disk on fire');
      return undefined;
    };
    c.request({ type: Cmd.WRITE, handle: 1n, offset: 4096n, data: Buffer.alloc(512) });
    c.request({ type: Cmd.WRITE, handle: 2n, offset: 8192n, data: Buffer.alloc(512) });
    c.request({ type: Cmd.READ, handle: 3n, offset: 12288n, length: 512 });
    const got = new Map<bigint, Reply>();
    for (let i = 0; i < 3; i++) {
      const r = await c.reply();
      got.set(r.handle, r);
    }
    expect([1n, 2n, 3n].map((h) => errorOf(got.get(h)!))).toEqual([Errno.EPERM, Errno.ENOSPC, Errno.EIO]);
    const fire = got.get(3n)!;
    expect(fire.kind === 'chunk' && fire.payload.subarray(6).toString()).toBe('disk on fire');
  });

  it('negotiates: LIST, INFO, meta contexts, unknown options and unknown exports', async () => {
    await start({ exportName: 'disk0', description: 'the disk' });
    const c = await client();
    expect(await c.greet()).toBe(3);
    const list = await c.option(Opt.LIST);
    expect(list.map((r) => r.type)).toEqual([Rep.SERVER, Rep.ACK]);
    expect(list[0]!.data.subarray(4, 4 + list[0]!.data.readUInt32BE(0)).toString()).toBe('disk0');
    expect((await c.option(Opt.LIST, Buffer.from('x')))[0]!.type).toBe(Rep.ERR_INVALID);
    expect((await c.option(9999))[0]!.type).toBe(Rep.ERR_UNSUP);
    expect((await c.option(Opt.STARTTLS))[0]!.type).toBe(Rep.ERR_UNSUP);
    expect((await c.option(Opt.EXTENDED_HEADERS))[0]!.type).toBe(Rep.ERR_UNSUP);
    // Meta contexts need structured replies first.
    expect((await c.option(Opt.LIST_META_CONTEXT, encodeMetaContextRequest('', [])))[0]!.type).toBe(Rep.ERR_INVALID);
    expect((await c.option(Opt.STRUCTURED_REPLY)).map((r) => r.type)).toEqual([Rep.ACK]);
    const lm = await c.option(Opt.LIST_META_CONTEXT, encodeMetaContextRequest('', []));
    expect(lm.map((r) => [r.type, r.data.subarray(4).toString()])).toEqual([[Rep.META_CONTEXT, BASE_ALLOCATION], [Rep.ACK, '']]);
    const lm2 = await c.option(Opt.LIST_META_CONTEXT, encodeMetaContextRequest('disk0', ['qemu:dirty-bitmap:x']));
    expect(lm2.map((r) => r.type)).toEqual([Rep.ACK]);
    expect((await c.option(Opt.SET_META_CONTEXT, encodeMetaContextRequest('nope', [BASE_ALLOCATION])))[0]!.type).toBe(Rep.ERR_UNKNOWN);
    expect((await c.option(Opt.SET_META_CONTEXT, Buffer.from([0, 0, 0, 9])))[0]!.type).toBe(Rep.ERR_INVALID);
    const sm = await c.option(Opt.SET_META_CONTEXT, encodeMetaContextRequest('ulobdev', [BASE_ALLOCATION, 'base:other']));
    expect(sm.map((r) => r.type)).toEqual([Rep.META_CONTEXT, Rep.ACK]);
    const info = await c.option(Opt.INFO, encodeInfoRequest('disk0', [Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE]));
    const infos = info.filter((r) => r.type === Rep.INFO).map((r) => r.data.readUInt16BE(0));
    expect(infos.sort()).toEqual([Info.EXPORT, Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE]);
    const desc = info.find((r) => r.type === Rep.INFO && r.data.readUInt16BE(0) === Info.DESCRIPTION)!;
    expect(desc.data.subarray(2).toString()).toBe('the disk');
    expect((await c.option(Opt.GO, encodeInfoRequest('other', [])))[0]!.type).toBe(Rep.ERR_UNKNOWN);
    expect((await c.option(Opt.GO, Buffer.from([0, 0, 0, 5, 0])))[0]!.type).toBe(Rep.ERR_INVALID);
    // After all that, GO still works and the negotiated context answers BLOCK_STATUS.
    const go = await c.option(Opt.GO, encodeInfoRequest('disk0', []));
    expect(go.map((r) => r.type)).toEqual([Rep.INFO, Rep.ACK]);
    c.request({ type: Cmd.BLOCK_STATUS, handle: 1n, offset: 0n, length: size });
    const r = await c.reply();
    expect(r.kind === 'chunk' && r.type).toBe(ReplyType.BLOCK_STATUS);
  });

  it('enters transmission with NBD_OPT_EXPORT_NAME, with or without the 124 zeroes', async () => {
    await start();
    for (const noZeroes of [true, false]) {
      const c = await client();
      await c.greet(noZeroes ? 3 : 1);
      c.send(encodeOption(Opt.EXPORT_NAME, Buffer.from('ulobdev')));
      const head = await c.bytes(10);
      expect(Number(head.readBigUInt64BE(0))).toBe(size);
      expect(head.readUInt16BE(8) & TxFlag.SEND_DF).toBe(0); // no structured replies negotiated
      if (!noZeroes) expect((await c.bytes(124)).equals(Buffer.alloc(124))).toBe(true);
      c.request({ type: Cmd.READ, handle: 5n, offset: 0n, length: 16 });
      const r = await c.reply();
      expect(r).toEqual({ kind: 'simple', error: 0, handle: 5n });
      expect((await c.bytes(16)).equals(mem.data.subarray(0, 16))).toBe(true);
      expect(c.queue.length).toBe(0);
    }
    const bad = await client();
    await bad.greet();
    bad.send(encodeOption(Opt.EXPORT_NAME, Buffer.from('no-such-export')));
    expect(await bad.closedWithin(2000)).toBe(true);
  });

  it('acks NBD_OPT_ABORT and closes; closes on NBD_CMD_DISC after replying to what was in flight', async () => {
    await start();
    const a = await client();
    await a.greet();
    a.send(encodeOption(Opt.ABORT));
    expect((await a.next(decodeOptionReply)).type).toBe(Rep.ACK);
    expect(await a.closedWithin(2000)).toBe(true);

    const d = await client();
    await d.handshake();
    const open = hold();
    d.request({ type: Cmd.WRITE, handle: 1n, offset: 0n, data: Buffer.alloc(512, 9) });
    d.request({ type: Cmd.DISC, handle: 2n });
    await new Promise((r) => setTimeout(r, 30));
    expect(d.ended).toBe(false);
    open();
    expect((await d.reply()).handle).toBe(1n);
    expect(await d.closedWithin(2000)).toBe(true);
    expect(mem.data[0]).toBe(9);
  });

  it('writes split anywhere across reads land byte for byte (headers, payloads read straight into their buffers, many requests per read)', async () => {
    await start();
    const c = await client();
    await c.handshake();
    const model = Buffer.from(mem.data);
    // Payloads around the sizes that matter: the slab (16 KiB) and the read buffer (64 KiB), and larger.
    const sizes = [1, 511, 4096, 16 * KiB + 1, 64 * KiB - 28, 64 * KiB + 1, 300 * KiB, 256 * KiB - 28, 280 * KiB + 3, 4096, 2];
    const parts: Buffer[] = [];
    // Where the stream is cut: inside the header of every other request, and pseudo-random
    // pieces of 1 B to 200 KiB (several small requests then arrive in one read).
    const cuts = new Set<number>();
    let at = 0;
    let offset = 3;
    for (const [i, n] of sizes.entries()) {
      const data = randomBytes(n);
      parts.push(encodeRequest({ type: Cmd.WRITE, flags: 0, handle: BigInt(i), offset: BigInt(offset), length: n, data }));
      data.copy(model, offset);
      offset += n + 1; // apart: the writes run concurrently
      if (i % 2 === 0) [5, 18].forEach((k) => cuts.add(at + k));
      at += 28 + n;
    }
    expect(offset).toBeLessThan(size);
    const stream = Buffer.concat(parts);
    let x = 12345;
    for (let p = 0; p < stream.length; ) {
      x = (x * 1103515245 + 12345) >>> 0;
      p += [1, 7, 27, 29, 4096, 65536, 200 * KiB][(x >>> 8) % 7]!;
      cuts.add(p);
    }
    // Each piece sent after the server had time to read the one before.
    let from = 0;
    for (const cut of [...cuts, stream.length].filter((k) => k > 0 && k <= stream.length).sort((a, b) => a - b)) {
      if (cut === from) continue;
      c.send(stream.subarray(from, cut));
      from = cut;
      await new Promise((r) => setTimeout(r, 1));
    }
    for (let i = 0; i < sizes.length; i++) expect(errorOf(await c.reply())).toBe(0);
    expect(mem.data.equals(model)).toBe(true);
  });

  it('answers reads and writes the backend does now (readNow, writeNow) at once; FUA, declined and bad requests go the usual way', async () => {
    /** MemoryBackend that also does reads and non-FUA writes now, unless `decline` says no. */
    class NowBackend extends MemoryBackend {
      nowReads = 0;
      nowWrites = 0;
      decline = new Set<number>();
      readNow(buf: Buffer, offset: number): boolean {
        if (this.decline.has(offset)) return false;
        this.nowReads++;
        buf.set(this.data.subarray(offset, offset + buf.byteLength));
        return true;
      }
      writeNow(offset: number, data: Uint8Array): boolean {
        if (this.decline.has(offset)) return false;
        this.nowWrites++;
        this.data.set(data, offset);
        return true;
      }
    }
    for (const structured of [true, false]) {
      const now = new NowBackend(size, { fill: (i) => (i * 13) & 0xff });
      mem = now;
      sock = join(dir, `now-${Math.random().toString(36).slice(2)}.sock`);
      server = new NbdServer({ backend: now });
      await server.listen({ path: sock });
      const c = await client();
      await c.handshake({ structured });
      const model = Buffer.from(now.data);
      now.decline.add(0x30000).add(0x31000);
      // One stream, so the server reads many requests at once: reads (8 done now, one declined, one
      // past the end), writes (8 done now, one declined, one FUA), each at its own place.
      const parts: Buffer[] = [];
      const reads = new Map<bigint, [number, number]>();
      let handle = 0n;
      for (const offset of [0, 4096, 8192, 20000, 65536, 100000, 300000, 0x30000]) {
        reads.set(++handle, [offset, 4096]);
        parts.push(encodeRequest({ type: Cmd.READ, flags: 0, handle, offset: BigInt(offset), length: 4096 }));
      }
      const past = ++handle;
      parts.push(encodeRequest({ type: Cmd.READ, flags: 0, handle: past, offset: BigInt(size - 512), length: 1024 }));
      const fua = 0x40000;
      for (const offset of [0x20000, 0x21000, 0x22000, 0x23000, 0x24000, 0x25000, 0x26000, 0x27000, 0x31000, fua]) {
        const data = randomBytes(offset === fua ? 512 : 4096);
        data.copy(model, offset);
        parts.push(encodeRequest({ type: Cmd.WRITE, flags: offset === fua ? CmdFlag.FUA : 0, handle: ++handle, offset: BigInt(offset), length: data.byteLength, data }));
      }
      c.send(Buffer.concat(parts));
      const seen = new Set<bigint>();
      for (let i = 0n; i < handle; i++) {
        const r = await c.reply();
        expect(seen.has(r.handle), `handle ${r.handle} answered twice`).toBe(false);
        seen.add(r.handle);
        if (r.handle === past) {
          expect(errorOf(r)).toBe(Errno.EINVAL);
          continue;
        }
        expect(errorOf(r), `handle ${r.handle}`).toBe(0);
        const read = reads.get(r.handle);
        if (!read) continue;
        const data = structured ? (r.kind === 'chunk' ? r.payload.subarray(8) : Buffer.alloc(0)) : await c.bytes(read[1]);
        expect(data.equals(model.subarray(read[0], read[0] + read[1])), `read ${r.handle}`).toBe(true);
      }
      expect(seen.size).toBe(Number(handle));
      expect(now.data.equals(model)).toBe(true);
      // Done now: 7 reads and 8 writes; the declined read and write, the FUA write and nothing
      // else went to read() and write() (the read past the end reached neither).
      expect([now.nowReads, now.nowWrites, now.reads, now.writes, now.flushes]).toEqual([7, 8, 1, 2, 0]);
      c.close();
      await server.close();
    }
  });

  it("reads a connection's socket into its own buffers on this Node (not Node's per-read buffers)", async () => {
    await start();
    const path = join(dir, `own-${Math.random().toString(36).slice(2)}.sock`);
    const made: Connection[] = [];
    const srv = net.createServer({ allowHalfOpen: true, pauseOnConnect: true }, (socket) => made.push(new Connection(socket, exportConfig({ backend: mem }), captureLogger().logger)));
    await new Promise<void>((resolve) => srv.listen(path, resolve));
    const c = await RawClient.connect(path);
    clients.push(c);
    await c.handshake();
    c.request({ type: Cmd.WRITE, handle: 1n, offset: 0n, data: Buffer.alloc(300 * KiB, 5) });
    expect(errorOf(await c.reply())).toBe(0);
    expect(made.length).toBe(1);
    expect(made[0]!.ownReads).toBe(true);
    expect(mem.data.subarray(0, 300 * KiB).equals(Buffer.alloc(300 * KiB, 5))).toBe(true);
    c.close();
    await made[0]!.done;
    await new Promise((resolve) => srv.close(resolve));
  });

  it('limits the requests in flight per connection and still answers them all', async () => {
    await start({ maxInflightRequests: 8 });
    const c = await client();
    await c.handshake();
    const open = hold();
    for (let i = 0; i < 100; i++) c.request({ type: Cmd.WRITE, handle: BigInt(i), offset: BigInt(i * 4096), data: Buffer.alloc(4096, i) });
    // Until the server has taken what it may (a fixed 100 ms could see fewer at load), then a
    // little longer: the limit holds while the writes are held.
    for (let i = 0; i < 500 && mem.active < 8; i++) await new Promise((r) => setTimeout(r, 10));
    await new Promise((r) => setTimeout(r, 100));
    expect(mem.active).toBe(8);
    open();
    const handles = new Set<bigint>();
    for (let i = 0; i < 100; i++) handles.add((await c.reply()).handle);
    expect(handles.size).toBe(100);
    expect(mem.maxActive).toBe(8);
    for (let i = 0; i < 100; i++) expect(mem.data[i * 4096 + 4095]).toBe(i & 0xff);
  });

  it('stops reading requests while a client does not read its replies', async () => {
    await start({ maxInflightBytes: MiB });
    const c = await client();
    await c.handshake();
    c.socket.pause();
    const n = 400;
    for (let i = 0; i < n; i++) c.request({ type: Cmd.READ, handle: BigInt(i), offset: 0n, length: 256 * KiB });
    await new Promise((r) => setTimeout(r, 300));
    // Without backpressure all 400 reads (100 MiB of replies) would have run by now.
    expect(mem.reads).toBeLessThan(60);
    c.socket.resume();
    for (let i = 0; i < n; i++) {
      const r = await c.reply();
      expect(errorOf(r)).toBe(0);
    }
    expect(mem.reads).toBe(n);
  });

  it('close() waits for requests in flight, answers them, then closes every connection', async () => {
    await start();
    const c = await client();
    await c.handshake();
    const idle = await client();
    await idle.greet();
    const open = hold();
    c.request({ type: Cmd.WRITE, handle: 1n, offset: 0n, data: Buffer.alloc(512, 0x77) });
    await new Promise((r) => setTimeout(r, 20));
    let closed = false;
    const closing = server.close().then(() => (closed = true));
    await new Promise((r) => setTimeout(r, 50));
    expect(closed).toBe(false);
    expect(await idle.closedWithin(1000)).toBe(true);
    open();
    expect((await c.reply()).handle).toBe(1n);
    await closing;
    expect(await c.closedWithin(1000)).toBe(true);
    expect(server.connections).toBe(0);
    expect(mem.data[0]).toBe(0x77);
  });

  it('replaces a stale socket file, refuses a live one and anything that is not a socket', async () => {
    const path = join(dir, 'stale.sock');
    const other = net.createServer();
    await new Promise<void>((r) => other.listen(path, r));
    await expect(new NbdServer({ backend: new MemoryBackend(4096) }).listen({ path })).rejects.toThrow(/another server is listening/);
    await new Promise<void>((r) => other.close(() => r()));
    // A server killed outright leaves its socket file behind, with nobody listening.
    const script = `require('net').createServer().listen(${JSON.stringify(path)}, () => process.kill(process.pid, 'SIGKILL'))`;
    await run(process.execPath, ['-e', script]);
    expect(lstatSync(path).isSocket()).toBe(true);
    mem = new MemoryBackend(4096);
    server = new NbdServer({ backend: mem });
    await server.listen({ path });
    expect((await runOk('nbdinfo', ['--size', nbdUrl(path)])).trim()).toBe('4096');
    const file = join(dir, 'not-a-socket');
    writeFileSync(file, 'keep me');
    await expect(new NbdServer({ backend: mem }).listen({ path: file })).rejects.toThrow(/not a socket/);
    expect(readFileSync(file, 'utf8')).toBe('keep me');
  });
});
