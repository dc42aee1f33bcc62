// The NBD codec: round trips of every message, decoding over arbitrarily chunked streams, the
// request checks, and the URL helpers.
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { InvalidArgumentError, IOFailedError, NbdProtocolError, ReadOnlyError } from '../../src/errors.js';
import {
  decodeGreeting,
  decodeOptionReply,
  decodeReply,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  encodeRequest,
} from '../../src/bdev/nbd-server/client-codec.js';
import {
  ByteQueue,
  Cmd,
  CmdFlag,
  Errno,
  IHAVEOPT,
  Info,
  MAX_STRING,
  NBD_MAGIC,
  Opt,
  REQUEST_MAGIC,
  Rep,
  ReplyFlag,
  ReplyType,
  TxFlag,
  checkRequest,
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
  errnoOf,
  parseInfoRequest,
  parseMetaContextRequest,
  type NbdOption,
  type NbdRequest,
  type TransmissionState,
} from '../../src/bdev/nbd-server/protocol.js';
import { formatNbdUrl, parseNbdUrl } from '../../src/bdev/nbd-server/server.js';

/** Splits `bytes` at the given cut points (any order, duplicates allowed). */
function split(bytes: Buffer, cuts: number[]): Buffer[] {
  const points = [...new Set(cuts.map((c) => c % (bytes.byteLength + 1)))].sort((a, b) => a - b);
  const out: Buffer[] = [];
  let prev = 0;
  for (const p of [...points, bytes.byteLength]) {
    out.push(bytes.subarray(prev, p));
    prev = p;
  }
  return out;
}

/** Feeds chunks one by one and decodes after each, as the server does on every 'data' event. */
function decodeChunked<T>(chunks: Buffer[], decode: (q: ByteQueue) => T | null): { items: T[]; left: number } {
  const q = new ByteQueue();
  const items: T[] = [];
  for (const c of chunks) {
    q.push(c);
    for (let v = decode(q); v !== null; v = decode(q)) items.push(v);
  }
  return { items, left: q.length };
}

const u64 = fc.bigInt({ min: 0n, max: 2n ** 64n - 1n });
const u32 = fc.nat({ max: 0xffffffff });
const u16 = fc.nat({ max: 0xffff });
const cuts = fc.array(fc.nat(), { maxLength: 20 });

const arbOption: fc.Arbitrary<NbdOption> = fc.record({
  option: u32,
  data: fc.uint8Array({ maxLength: 300 }).map((a) => Buffer.from(a)),
});

const arbRequest: fc.Arbitrary<NbdRequest> = fc
  .record({
    flags: u16,
    type: fc.oneof(fc.constantFrom(0, 1, 2, 3, 4, 5, 6, 7), u16),
    handle: u64,
    offset: u64,
    length: u32,
    payload: fc.uint8Array({ maxLength: 2000 }),
  })
  .map(({ payload, ...r }) => (r.type === Cmd.WRITE ? { ...r, length: payload.byteLength, data: Buffer.from(payload) } : r));

describe('ByteQueue', () => {
  it('returns the pushed bytes in order however they are taken', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 500 }), cuts, fc.array(fc.nat({ max: 60 }), { maxLength: 40 }), (bytes, c, takes) => {
        const all = Buffer.from(bytes);
        const q = new ByteQueue();
        for (const chunk of split(all, c)) q.push(chunk);
        expect(q.length).toBe(all.byteLength);
        const got: Buffer[] = [];
        for (const t of takes) {
          const n = Math.min(t, q.length);
          expect(q.peek(n)).toEqual(all.subarray(Buffer.concat(got).byteLength, Buffer.concat(got).byteLength + n));
          got.push(Buffer.from(q.take(n)));
        }
        got.push(Buffer.from(q.take(q.length)));
        expect(Buffer.concat(got)).toEqual(all);
        expect(q.length).toBe(0);
      }),
    );
  });

  it('refuses to peek or skip past its end', () => {
    const q = new ByteQueue();
    q.push(Buffer.from([1, 2, 3]));
    expect(() => q.peek(4)).toThrow(RangeError);
    expect(() => q.skip(4)).toThrow(RangeError);
  });
});

describe('handshake messages', () => {
  it('greets with NBDMAGIC, IHAVEOPT and the handshake flags', () => {
    const g = encodeGreeting(3);
    expect(g.subarray(0, 16).toString('latin1')).toBe('NBDMAGICIHAVEOPT');
    expect(g.byteLength).toBe(18);
    const q = new ByteQueue();
    q.push(g);
    expect(decodeGreeting(q)).toEqual({ handshakeFlags: 3 });
    expect(NBD_MAGIC).toBe(0x4e42444d41474943n);
  });

  it('decodes client flags only once all four bytes are there', () => {
    const q = new ByteQueue();
    q.push(Buffer.from([0, 0, 0]));
    expect(decodeClientFlags(q)).toBeNull();
    q.push(Buffer.from([3]));
    expect(decodeClientFlags(q)).toBe(3);
    expect(q.length).toBe(0);
  });

  it('decodes any sequence of options from any chunking of the stream', () => {
    fc.assert(
      fc.property(fc.array(arbOption, { maxLength: 8 }), cuts, (options, c) => {
        const stream = Buffer.concat(options.map((o) => encodeOption(o.option, o.data)));
        const { items, left } = decodeChunked(split(stream, c), (q) => decodeOption(q, 1000));
        expect(items).toEqual(options);
        expect(left).toBe(0);
      }),
    );
  });

  it('rejects a bad option magic and an oversized option from the header alone', () => {
    const bad = encodeOption(Opt.GO, Buffer.alloc(10));
    bad.writeBigUInt64BE(0x1122334455667788n, 0);
    const q = new ByteQueue();
    q.push(bad.subarray(0, 16));
    expect(() => decodeOption(q, 1000)).toThrow(NbdProtocolError);

    const huge = encodeOption(Opt.GO).subarray(0, 16);
    huge.writeUInt32BE(0xffffffff, 12);
    const q2 = new ByteQueue();
    q2.push(huge);
    expect(() => decodeOption(q2, 65536)).toThrow(/4294967295 bytes of data/);
  });

  it('round-trips NBD_OPT_INFO / NBD_OPT_GO data and rejects inconsistent lengths', () => {
    fc.assert(
      fc.property(fc.string({ maxLength: 100 }), fc.array(u16, { maxLength: 10 }), (name, requests) => {
        expect(parseInfoRequest(encodeInfoRequest(name, requests))).toEqual({ name, requests });
        const data = encodeInfoRequest(name, requests);
        expect(parseInfoRequest(Buffer.concat([data, Buffer.from([0])]))).toBeUndefined();
        expect(parseInfoRequest(data.subarray(0, data.byteLength - 1))).toBeUndefined();
      }),
    );
  });

  it('round-trips meta context data and rejects inconsistent lengths', () => {
    fc.assert(
      fc.property(fc.string({ maxLength: 50 }), fc.array(fc.string({ maxLength: 40 }), { maxLength: 6 }), (name, queries) => {
        const data = encodeMetaContextRequest(name, queries);
        expect(parseMetaContextRequest(data)).toEqual({ name, queries });
        expect(parseMetaContextRequest(Buffer.concat([data, Buffer.from([0])]))).toBeUndefined();
        expect(parseMetaContextRequest(data.subarray(0, data.byteLength - 1))).toBeUndefined();
      }),
    );
  });

  it('never throws on garbage option data', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 200 }), (bytes) => {
        const b = Buffer.from(bytes);
        parseInfoRequest(b);
        parseMetaContextRequest(b);
      }),
    );
    // A count of 2^32-1 queries with 4 bytes of data behind it is refused without looping.
    const absurd = Buffer.from([0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
    expect(parseMetaContextRequest(absurd)).toBeUndefined();
  });

  it('round-trips option replies', () => {
    fc.assert(
      fc.property(u32, u32, fc.uint8Array({ maxLength: 200 }), cuts, (option, type, data, c) => {
        const msg = encodeOptionReply(option, type, data);
        const { items } = decodeChunked(split(msg, c), decodeOptionReply);
        expect(items).toEqual([{ option, type, data: Buffer.from(data) }]);
      }),
    );
  });

  it('lays out the export-name reply, INFO payloads, SERVER and META_CONTEXT data', () => {
    expect(encodeExportNameReply(1 << 20, 0x1234, true).byteLength).toBe(134);
    const r = encodeExportNameReply(2 ** 40 + 5, 0x1234, false);
    expect(r.byteLength).toBe(10);
    expect(r.readBigUInt64BE(0)).toBe(2n ** 40n + 5n);
    expect(r.readUInt16BE(8)).toBe(0x1234);

    const e = encodeInfoExport(12345, TxFlag.HAS_FLAGS | TxFlag.READ_ONLY);
    expect([e.readUInt16BE(0), Number(e.readBigUInt64BE(2)), e.readUInt16BE(10)]).toEqual([Info.EXPORT, 12345, 3]);
    const bs = encodeInfoBlockSize(512, 4096, 32 << 20);
    expect([bs.readUInt16BE(0), bs.readUInt32BE(2), bs.readUInt32BE(6), bs.readUInt32BE(10)]).toEqual([Info.BLOCK_SIZE, 512, 4096, 32 << 20]);
    const n = encodeInfoString(Info.NAME, 'ulobdev');
    expect([n.readUInt16BE(0), n.subarray(2).toString()]).toEqual([Info.NAME, 'ulobdev']);
    const s = encodeServerData('disk', 'a cached disk');
    expect([s.readUInt32BE(0), s.subarray(4, 8).toString(), s.subarray(8).toString()]).toEqual([4, 'disk', 'a cached disk']);
    const m = encodeMetaContext(7, 'base:allocation');
    expect([m.readUInt32BE(0), m.subarray(4).toString()]).toEqual([7, 'base:allocation']);
  });

  it('cuts long messages to 4096 bytes at a character boundary', () => {
    const msg = 'é'.repeat(3000); // 6000 bytes
    const reply = encodeOptionError(Opt.GO, Rep.ERR_UNKNOWN, msg);
    const data = reply.subarray(20);
    expect(data.byteLength).toBeLessThanOrEqual(MAX_STRING);
    expect(data.byteLength).toBe(4096);
    expect(data.toString('utf8')).toBe('é'.repeat(2048));
    const chunk = encodeErrorChunk(1n, Errno.EIO, 'x€'.repeat(2000));
    const len = chunk.readUInt16BE(24);
    expect(len).toBeLessThanOrEqual(MAX_STRING);
    expect(chunk.subarray(26).toString('utf8')).not.toContain('\ufffd');
  });
});

describe('transmission messages', () => {
  it('decodes any sequence of requests (with write payloads) from any chunking', () => {
    fc.assert(
      fc.property(fc.array(arbRequest, { maxLength: 8 }), cuts, (reqs, c) => {
        const stream = Buffer.concat(reqs.map(encodeRequest));
        const { items, left } = decodeChunked(split(stream, c), (q) => decodeRequest(q, 1 << 20));
        expect(items).toEqual(reqs);
        expect(left).toBe(0);
      }),
    );
  });

  it('waits for the whole write payload before returning the request', () => {
    const req = encodeRequest({ flags: 0, type: Cmd.WRITE, handle: 9n, offset: 0n, length: 4, data: Buffer.from('abcd') });
    const q = new ByteQueue();
    q.push(req.subarray(0, 30));
    expect(decodeRequest(q, 100)).toBeNull();
    expect(q.length).toBe(30);
    q.push(req.subarray(30));
    expect(decodeRequest(q, 100)?.data?.toString()).toBe('abcd');
  });

  it('rejects a bad request magic, and a write over the maximum from its header alone', () => {
    const q = new ByteQueue();
    const bad = encodeRequest({ flags: 0, type: Cmd.READ, handle: 1n, offset: 0n, length: 512 });
    bad.writeUInt32BE(0xdeadbeef, 0);
    q.push(bad);
    expect(() => decodeRequest(q, 1 << 20)).toThrow(NbdProtocolError);

    const q2 = new ByteQueue();
    const header = encodeRequest({ flags: 0, type: Cmd.WRITE, handle: 1n, offset: 0n, length: 0 });
    header.writeUInt32BE(0xffffffff, 24);
    q2.push(header);
    expect(() => decodeRequest(q2, 32 << 20)).toThrow(/exceeds the maximum payload/);
    // A READ that large is not a protocol error: it gets an EINVAL reply (see checkRequest).
    const q3 = new ByteQueue();
    const read = encodeRequest({ flags: 0, type: Cmd.READ, handle: 1n, offset: 0n, length: 0xffffffff });
    q3.push(read);
    expect(decodeRequest(q3, 32 << 20)?.length).toBe(0xffffffff);
    expect(REQUEST_MAGIC).toBe(0x25609513);
  });

  it('round-trips simple replies and structured chunks from any chunking', () => {
    fc.assert(
      fc.property(u64, u32, fc.uint8Array({ minLength: 1, maxLength: 300 }), fc.nat({ max: 2 ** 40 }), fc.string({ maxLength: 80 }), cuts, (handle, err, data, offset, msg, c) => {
        const stream = Buffer.concat([
          encodeSimpleReply(err, handle),
          encodeOffsetDataHeader(ReplyFlag.DONE, handle, offset, data.byteLength),
          Buffer.from(data),
          encodeErrorChunk(handle, Errno.EIO, msg),
          encodeBlockStatusChunk(ReplyFlag.DONE, handle, 1, [{ length: 4096, flags: 0 }, { length: 512, flags: 3 }]),
          encodeNoneChunk(handle),
        ]);
        const { items, left } = decodeChunked(split(stream, c), decodeReply);
        expect(left).toBe(0);
        expect(items).toHaveLength(5);
        expect(items[0]).toEqual({ kind: 'simple', error: err, handle });
        const [d, e, bs, none] = items.slice(1) as Extract<(typeof items)[number], { kind: 'chunk' }>[];
        expect([d!.type, d!.flags, d!.handle]).toEqual([ReplyType.OFFSET_DATA, ReplyFlag.DONE, handle]);
        expect(Number(d!.payload.readBigUInt64BE(0))).toBe(offset);
        expect(d!.payload.subarray(8)).toEqual(Buffer.from(data));
        expect([e!.type, e!.payload.readUInt32BE(0), e!.payload.subarray(6).toString()]).toEqual([ReplyType.ERROR, Errno.EIO, msg]);
        expect(e!.payload.readUInt16BE(4)).toBe(Buffer.byteLength(msg));
        expect([bs!.type, bs!.payload.readUInt32BE(0), bs!.payload.readUInt32BE(4), bs!.payload.readUInt32BE(16)]).toEqual([ReplyType.BLOCK_STATUS, 1, 4096, 3]);
        expect([none!.type, none!.flags, none!.payload.byteLength]).toEqual([ReplyType.NONE, ReplyFlag.DONE, 0]);
      }),
    );
  });

  it('throws on a reply with an unknown magic', () => {
    const q = new ByteQueue();
    q.push(Buffer.alloc(16, 0x55));
    expect(() => decodeReply(q)).toThrow(NbdProtocolError);
  });
});

describe('checkRequest', () => {
  const writable = TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_FUA | TxFlag.SEND_TRIM | TxFlag.SEND_WRITE_ZEROES | TxFlag.SEND_CACHE;
  const state: TransmissionState = { size: 1 << 20, transmissionFlags: writable | TxFlag.SEND_DF, metaContext: true, maxPayload: 1 << 16 };
  const ro: TransmissionState = { ...state, transmissionFlags: TxFlag.HAS_FLAGS | TxFlag.READ_ONLY | TxFlag.SEND_FLUSH };
  const req = (type: number, offset: number | bigint, length: number, flags = 0): NbdRequest => ({ type, flags, handle: 1n, offset: BigInt(offset), length });
  const errno = (r: NbdRequest, s = state) => checkRequest(r, s)?.errno ?? 0;

  it('accepts valid requests up to the last byte', () => {
    expect(errno(req(Cmd.READ, 0, 4096))).toBe(0);
    expect(errno(req(Cmd.READ, (1 << 20) - 512, 512, CmdFlag.DF))).toBe(0);
    expect(errno(req(Cmd.WRITE, (1 << 20) - 1, 1, CmdFlag.FUA))).toBe(0);
    expect(errno(req(Cmd.WRITE_ZEROES, 0, 1 << 20, CmdFlag.NO_HOLE | CmdFlag.FUA))).toBe(0);
    expect(errno(req(Cmd.TRIM, 0, 1 << 20))).toBe(0);
    expect(errno(req(Cmd.CACHE, 4096, 1 << 19))).toBe(0);
    expect(errno(req(Cmd.BLOCK_STATUS, 0, 1 << 20, CmdFlag.REQ_ONE))).toBe(0);
    expect(errno(req(Cmd.READ, 1 << 20, 0))).toBe(0);
  });

  it('answers ranges beyond the export with EINVAL (ENOSPC for writes), without overflowing', () => {
    expect(errno(req(Cmd.READ, (1 << 20) - 511, 512))).toBe(Errno.EINVAL);
    expect(errno(req(Cmd.TRIM, 1 << 20, 1))).toBe(Errno.EINVAL);
    expect(errno(req(Cmd.CACHE, 2n ** 64n - 1n, 0xffffffff))).toBe(Errno.EINVAL);
    expect(errno(req(Cmd.READ, 2n ** 64n - 1n, 1))).toBe(Errno.EINVAL);
    expect(errno(req(Cmd.WRITE, (1 << 20) - 1, 2))).toBe(Errno.ENOSPC);
    expect(errno(req(Cmd.WRITE_ZEROES, 2n ** 63n, 1))).toBe(Errno.ENOSPC);
    expect(errno(req(Cmd.BLOCK_STATUS, 1 << 20, 1))).toBe(Errno.EINVAL);
  });

  it('ignores the reserved range of FLUSH', () => {
    expect(errno(req(Cmd.FLUSH, 2n ** 64n - 1n, 0xffffffff))).toBe(0);
  });

  it('rejects unknown commands and flags not valid for the command with EINVAL', () => {
    expect(errno(req(Cmd.RESIZE, 0, 0))).toBe(Errno.EINVAL);
    expect(errno(req(0xffff, 0, 0))).toBe(Errno.EINVAL);
    expect(errno(req(Cmd.READ, 0, 512, CmdFlag.NO_HOLE))).toBe(Errno.EINVAL);
    expect(errno(req(Cmd.WRITE, 0, 512, CmdFlag.DF))).toBe(Errno.EINVAL);
    expect(errno(req(Cmd.READ, 0, 512, CmdFlag.FAST_ZERO))).toBe(Errno.EINVAL);
    expect(errno(req(Cmd.WRITE_ZEROES, 0, 512, CmdFlag.FAST_ZERO))).toBe(Errno.EINVAL);
    expect(errno(req(Cmd.READ, 0, 512, 0x8000))).toBe(Errno.EINVAL);
    // DF only when SEND_DF was advertised (structured replies), FUA only with SEND_FUA.
    expect(errno(req(Cmd.READ, 0, 512, CmdFlag.DF), { ...state, transmissionFlags: writable })).toBe(Errno.EINVAL);
    expect(errno(req(Cmd.FLUSH, 0, 0, CmdFlag.FUA), ro)).toBe(Errno.EINVAL);
  });

  it('rejects writes, trims and write-zeroes on a read-only export with EPERM', () => {
    for (const type of [Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES]) expect(errno(req(type, 0, 512), ro)).toBe(Errno.EPERM);
    expect(errno(req(Cmd.WRITE, 0, 512, CmdFlag.FUA), ro)).toBe(Errno.EPERM);
    expect(errno(req(Cmd.READ, 0, 512), ro)).toBe(0);
    expect(errno(req(Cmd.FLUSH, 0, 0), ro)).toBe(0);
  });

  it('rejects BLOCK_STATUS without a metadata context or of length 0, and reads over the maximum', () => {
    expect(errno(req(Cmd.BLOCK_STATUS, 0, 512), { ...state, metaContext: false })).toBe(Errno.EINVAL);
    expect(errno(req(Cmd.BLOCK_STATUS, 0, 0))).toBe(Errno.EINVAL);
    expect(errno(req(Cmd.READ, 0, (1 << 16) + 1))).toBe(Errno.EINVAL);
    expect(checkRequest(req(Cmd.READ, 0, 1 << 17), state)?.message).toMatch(/maximum payload/);
  });
});

describe('errnoOf', () => {
  const coded = (code: string) => Object.assign(new Error(code), { code });
  it('maps backend errors to NBD error values, EIO by default', () => {
    expect(errnoOf(new ReadOnlyError('ro'))).toBe(Errno.EPERM);
    expect(errnoOf(new InvalidArgumentError('bad'))).toBe(Errno.EINVAL);
    expect(errnoOf(coded('ENOSPC'))).toBe(Errno.ENOSPC);
    expect(errnoOf(coded('EDQUOT'))).toBe(Errno.ENOSPC);
    expect(errnoOf(coded('EROFS'))).toBe(Errno.EPERM);
    expect(errnoOf(coded('ENOMEM'))).toBe(Errno.ENOMEM);
    expect(errnoOf(new IOFailedError('write failed', { cause: coded('ENOSPC') }))).toBe(Errno.ENOSPC);
    expect(errnoOf(new IOFailedError('read failed', { cause: coded('EIO') }))).toBe(Errno.EIO);
    expect(errnoOf(new Error('anything'))).toBe(Errno.EIO);
    expect(errnoOf('a string')).toBe(Errno.EIO);
    expect(errnoOf(null)).toBe(Errno.EIO);
  });
});

describe('NBD URLs', () => {
  it('parses unix and tcp URLs', () => {
    expect(parseNbdUrl('nbd+unix:///?socket=/run/ulobdev/disk.sock')).toEqual({ path: '/run/ulobdev/disk.sock' });
    expect(parseNbdUrl('nbd+unix:///ulobdev?socket=/tmp/a%20b.sock')).toEqual({ path: '/tmp/a b.sock' });
    expect(parseNbdUrl('nbd://127.0.0.1:10900')).toEqual({ host: '127.0.0.1', port: 10900 });
    expect(parseNbdUrl('nbd://example.com/disk')).toEqual({ host: 'example.com', port: 10809 });
    expect(parseNbdUrl('nbd://[::1]:9000')).toEqual({ host: '::1', port: 9000 });
  });

  it('refuses anything else with an InvalidArgumentError', () => {
    for (const bad of ['', 'nbd+unix:///', 'nbd+unix:///?sock=/x', 'nbd+unix://host/?socket=/x', 'nbd://', 'nbds://host', 'http://host', '/tmp/x.sock', 'nbd://host:99999']) {
      expect(() => parseNbdUrl(bad), bad).toThrow(InvalidArgumentError);
    }
  });

  it('formats what it parses', () => {
    for (const a of [{ path: '/tmp/x y/disk.sock' }, { host: '127.0.0.1', port: 10809 }, { host: '::1', port: 1 }]) {
      expect(parseNbdUrl(formatNbdUrl(a))).toEqual(a);
    }
    expect(formatNbdUrl({ path: '/tmp/s.sock' })).toBe('nbd+unix:///?socket=/tmp/s.sock');
    expect(IHAVEOPT).toBe(0x49484156454f5054n);
  });
});
