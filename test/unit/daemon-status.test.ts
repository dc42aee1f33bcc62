// What a new user reads from status, flush and detach, on a serve-only daemon in this process (no
// root, no kernel device): writes count as dirty the moment they are answered (not a second later,
// at the engine's commit), so a detach right after a write flushes them; cached, dirty and zeroed
// bytes agree with each other; a flush that finds nothing dirty does not replace the last flush
// that wrote something; a read-only attach refuses a flush saying what to do; a name in use is
// refused naming the daemon that has it; an HTTP image is not called a disk.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { Daemon, describeFlush, type AttachOptions } from '../../src/daemon/daemon.js';
import type { Metadata } from '../../src/cache/metadata.js';
import { controlRequest } from '../../src/daemon/control.js';
import { DeviceBusyError, ReadOnlyError } from '../../src/errors.js';
import { openBacking } from '../../src/source/backing.js';
import type { Source } from '../../src/source/source.js';
import { formatStatus } from '../../src/cli/ulobdev.js';
import { formatBytes } from '../../src/units.js';

const KiB = 1024;
const MiB = 1024 * KiB;

let dir: string;
let disk: string;
const running: Daemon[] = [];

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'ulob-daemon-status-'));
  disk = join(dir, 'disk.img');
  writeFileSync(disk, Buffer.alloc(4 * MiB, 7));
});

afterEach(async () => {
  for (const d of running.splice(0)) await d.detach().catch(() => undefined);
  rmSync(dir, { recursive: true, force: true });
});

/** A serve-only daemon over `disk` with the cache in the scratch dir; extra options override. */
async function start(options: Partial<AttachOptions> = {}, socket = 'nbd.sock'): Promise<Daemon> {
  const d = await Daemon.start({
    device: `nbd+unix:///?socket=${join(dir, socket)}`,
    openSource: ({ writable }) => openBacking(disk, { writable }),
    cache: join(dir, 'c.cache'),
    writeback: true,
    name: 'cache1',
    stateDir: join(dir, 'state'),
    runDir: join(dir, 'run'),
    logger: pino({ enabled: false }),
    ...options,
  });
  running.push(d);
  return d;
}

async function detach(d: Daemon) {
  running.splice(running.indexOf(d), 1);
  return d.detach();
}

function data(length: number, seed: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) b[i] = (i * 31 + seed) & 0xff;
  return b;
}

describe('writes count as dirty at once', () => {
  it('a detach right after a write flushes it (the policy flushes on detach) and says so', async () => {
    const d = await start({ writebackPolicy: { maxDirtyAgeMs: 3600_000 } });
    const written = data(256 * KiB, 1);
    await d.engine.write(MiB, written);
    // Answered, not committed yet (the commit runs a second later): dirty and cached already.
    expect(d.engine.store.dirty.count()).toBe(0);
    const st = d.status();
    expect(st.dirtyBytes).toBe(256 * KiB);
    expect(st.cachedBytes).toBeGreaterThanOrEqual(256 * KiB);
    expect(st.bytesAtRisk).toBe(256 * KiB);
    const result = await detach(d);
    expect(result.flushed?.bytes).toBe(256 * KiB);
    expect(result.dirtyBytes).toBe(0);
    expect(readFileSync(disk).subarray(MiB, MiB + 256 * KiB).equals(written)).toBe(true);
  });

  it('`ulobdev flush` right after a write starts a flush, not "nothing dirty"', async () => {
    const d = await start();
    await d.engine.write(0, data(64 * KiB, 2));
    const r = await controlRequest(join(dir, 'run', 'cache1.sock'), { cmd: 'flush', wait: false });
    expect(r).toEqual({ started: true, dirtyBytes: 64 * KiB });
  });
});

describe('status numbers', () => {
  it('dirty data is part of what is cached; zeroed blocks are dirty, shown apart, and say what they are', async () => {
    const d = await start();
    await d.engine.write(0, data(128 * KiB, 3));
    await d.engine.zero(MiB, 2 * MiB);
    const st = d.status();
    expect(st.dirtyBytes).toBe(128 * KiB + 2 * MiB);
    expect(st.zeroBytes).toBe(2 * MiB);
    expect(st.cachedBytes).toBe(128 * KiB);
    const line = formatStatus(st).split('\n')[1]!;
    expect(line).toMatch(/cached 128 KiB \(3\.1%\), dirty 128 KiB \+ 2 MiB zeroed \(discarded ranges: they read as zeros, take no flash, and the next flush writes zeros to the disk\)$/);
  });

  it('a flush that finds nothing dirty keeps the last one that wrote something, also after a restart', async () => {
    let d = await start();
    await d.engine.write(0, data(64 * KiB, 4));
    expect((await d.flush()).bytes).toBe(64 * KiB);
    const first = d.status().writeback!;
    expect(first).toMatchObject({ lastFlushBytes: 64 * KiB, lastEmptyFlushAt: null });
    await new Promise((r) => setTimeout(r, 5));
    expect((await d.flush()).blocks).toBe(0);
    const after = d.status().writeback!;
    expect(after.lastFlushAt).toBe(first.lastFlushAt);
    expect(after.lastFlushBytes).toBe(64 * KiB);
    expect(after.lastEmptyFlushAt).toBeGreaterThan(first.lastFlushAt!);
    expect(formatStatus(d.status())).toMatch(/last flush [^\n]* \(64 KiB\), a later one [^\n]* found nothing dirty, next -/);
    await detach(d);
    d = await start();
    expect(d.status().writeback).toMatchObject({ lastFlushAt: first.lastFlushAt, lastFlushBytes: 64 * KiB, lastEmptyFlushAt: after.lastEmptyFlushAt });
    // The next flush that writes replaces both.
    await d.engine.write(0, data(8 * KiB, 5));
    await d.flush();
    expect(d.status().writeback).toMatchObject({ lastFlushBytes: 8 * KiB, lastEmptyFlushAt: null });
  });
});

describe('a flush cut by a crash', () => {
  it('shows in status after the restart until a flush completes (newuser12: it showed only in `report`)', async () => {
    let d = await start();
    await d.engine.write(0, data(64 * KiB, 9));
    await d.flush();
    expect(d.status().writeback!.cutFlush).toBeNull();
    await new Promise((r) => setTimeout(r, 5));
    // What a daemon killed mid-flush leaves, ended as the next start's recovery ends it.
    const meta = d.engine.store.history as Metadata;
    const epoch = d.engine.store.info.flushEpoch + 1;
    meta.flushStarted(epoch, Date.now(), 'schedule');
    expect(meta.endInterruptedFlushes()).toBe(1);
    await d.engine.write(0, data(64 * KiB, 10));
    await detach(d);
    d = await start();
    expect(d.status().writeback!.cutFlush).toMatchObject({ epoch, error: expect.stringMatching(/^interrupted/) });
    expect(formatStatus(d.status())).toMatch(new RegExp(`flush of epoch ${epoch} \\([^\n]*\\) did not complete \\(interrupted[^\n]*: the disk is not a consistent image until a flush completes`));
    await d.flush();
    expect(d.status().writeback!.cutFlush).toBeNull();
    expect(formatStatus(d.status())).not.toMatch(/did not complete/);
  });
});

describe('detach of a read-only cache', () => {
  it('does not say "the disk has everything" (an HTTP image or a library source has no disk: newuser12)', async () => {
    const d = await start({ writeback: false });
    await d.engine.read(0, 64 * KiB);
    const r = await detach(d);
    expect(describeFlush(r)).toBe('nothing to write back (a read-only cache)');
    expect(describeFlush({ ...r, readOnly: false })).toBe('nothing to write back: the disk has everything');
  });
});

describe('flush on a read-only attach', () => {
  it('refuses saying what to do with its dirty data, with --wait and without', async () => {
    let d = await start();
    await d.engine.write(0, data(64 * KiB, 6));
    await detach(d); // no policy: detach does not flush, the data stays dirty in the cache
    d = await start({ writeback: false });
    expect(d.status().dirtyBytes).toBe(64 * KiB);
    const wanted = /^nbd\+unix:\S+ is attached read-only, so it cannot flush its 64 KiB of dirty data \(written during an earlier --writeback attach; it stays in the cache, safe\): detach it, attach it again with --writeback, then run ulobdev flush$/;
    const waited = await d.flush().catch((err: unknown) => err);
    expect(waited).toBeInstanceOf(ReadOnlyError);
    expect((waited as Error).message).toMatch(wanted);
    const started = await controlRequest(join(dir, 'run', 'cache1.sock'), { cmd: 'flush', wait: false }).catch((err: unknown) => err);
    expect((started as { code?: string }).code).toBe('ULOB_E_READ_ONLY');
    expect((started as Error).message).toMatch(wanted);
  });

  it('with nothing dirty says there is nothing to flush', async () => {
    const d = await start({ writeback: false });
    await expect(d.flush()).rejects.toThrow(/is attached read-only and nothing is dirty: there is nothing to flush \(attach it with --writeback to cache writes\)$/);
  });
});

describe('a name in use', () => {
  it('is refused naming the daemon that has it and what to do', async () => {
    const first = await start();
    const err = await start({ cache: join(dir, 'other.cache') }, 'other.sock').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(DeviceBusyError);
    expect((err as Error).message).toBe(
      `the name "cache1" is taken by the ulobdev daemon of ${first.device} (pid ${process.pid}): give this attach another --name, or detach that one first (ulobdev detach cache1)`,
    );
  });
});

describe('flash use', () => {
  it('shows what the bitmap and the metadata take beside the cache file (newuser13: `used` hid them)', async () => {
    const d = await start({ cacheSize: { bytes: 2 * MiB } });
    await d.engine.write(0, data(64 * KiB, 11));
    await d.refreshStatus();
    const st = d.status();
    // The bitmap file alone is at least one 4 KiB block; the metadata holds a few pages.
    expect(st.overheadBytes).toBeGreaterThanOrEqual(8 * KiB);
    expect(formatStatus(st)).toMatch(new RegExp(`^ {2}flash: budget 2 MiB, [^\n]*; bitmap and metadata ${formatBytes(st.overheadBytes)} more$`, 'm'));
  });
});

describe('an HTTP image', () => {
  it('is called an image and its server, not a disk, and shows no dirty data', async () => {
    const file = await openBacking(disk, { writable: false });
    const url = 'http://127.0.0.1:1/image.img';
    // The HTTP source's description and stats() as status sees them (src/source/http.ts).
    const source: Source = { size: file.size, id: 'http-test', description: url, readAt: (b, p) => file.readAt(b, p), close: () => file.close(), stats: () => ({ url, requests: 0 }) };
    const d = await start({ writeback: false, openSource: async () => source });
    const text = formatStatus(d.status());
    expect(text).toMatch(/^ {2}size 4 MiB, block 4 KiB, cached 0 B \(0%\)$/m);
    expect(text).toMatch(/^ {2}flash: a full mirror of the image, /m);
    expect(text).toMatch(/^ {2}HTTP server ok$/m);
    expect(text).not.toMatch(/\bdisk\b/);
  });
});

describe('disk power control on a disk that takes no power commands (newuser12 F1)', () => {
  it('--spindown and --standby-timeout asked for: one notice at the attach, and status says it is off', async () => {
    const notices: string[] = [];
    // An image file takes no ATA commands: DiskPower.open says why (not a block device).
    const d = await start({ writebackPolicy: { spindown: true, standbyTimeoutSeconds: 600, powerDevice: disk }, onNotice: (l) => notices.push(l) });
    const off = notices.filter((l) => l.startsWith('disk power control is off'));
    expect(off).toEqual([`disk power control is off for ${disk}: it is not a block device; --spindown and --standby-timeout do nothing here`]);
    const st = d.status();
    expect(st.writeback?.powerControl).toBeNull();
    expect(st.writeback?.powerControlOff).toBe('it is not a block device');
    expect(formatStatus(st)).toMatch(/^ {2}disk power control OFF: it is not a block device; --spindown and --standby-timeout do nothing here$/m);
  });

  it('not asked for: no notice and no OFF line (a file disk is the demo, not a mistake)', async () => {
    const notices: string[] = [];
    const d = await start({ writebackPolicy: { powerDevice: disk }, onNotice: (l) => notices.push(l) });
    expect(notices.filter((l) => l.includes('power control'))).toEqual([]);
    expect(formatStatus(d.status())).not.toMatch(/power control OFF/);
  });
});
