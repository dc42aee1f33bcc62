// A crashable model of the files under the engine, for model-based crash tests.
//
// Each file keeps a durable image and, per 512-byte sector, the versions written since the last
// sync. A crash keeps, for every such sector independently, the durable version or any one of the
// versions written since (the page cache may have written any of them back, in any order), so
// unsynced writes are lost, kept, or torn at sector granularity. A "process" crash keeps all of
// them (the kernel's page cache survives a daemon's death).
//
// Files are sparse: each sector is allocated or a hole. A punched hole (fallocate PUNCH_HOLE) is
// one more version of its sectors, as unsynced as a write until the next sync; so is a hole a
// truncate adds. allocatedBytes() counts the allocated sectors (st_blocks, at sector grain).
//
// Every write, sync, allocate, truncate, punch and metadata transaction is a persistence point:
// `crashAt` makes the n-th one throw SimulatedCrash before it takes effect, and every later one too.
import { posixStorage } from '../../src/storage/posix-storage.js';
import type { BlockFile, OpenOptions, Storage } from '../../src/storage/storage.js';
import { Metadata } from '../../src/cache/metadata.js';
import type { MetadataFactory } from '../../src/cache/store.js';
import type { Extent } from '../../src/cache/layout.js';

export const SECTOR = 512;

export class SimulatedCrash extends Error {
  constructor() {
    super('simulated crash');
  }
}

export type CrashKind = 'power' | 'process';

/** A small deterministic PRNG so a failing seed replays the same crash. */
export class Rng {
  #state: number;
  constructor(seed: number) {
    this.#state = seed >>> 0 || 1;
  }
  next(): number {
    // xorshift32
    let x = this.#state;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.#state = x >>> 0;
    return this.#state / 2 ** 32;
  }
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
}

/** A version of a sector: its bytes, or null for a hole (reads as zeros, takes no space). */
type Version = Buffer | null;

export class ModelFile {
  durable: Buffer;
  visible: Buffer;
  /** Per sector: 1 where the durable (or visible) state is a hole. */
  durableHole: Uint8Array;
  visibleHole: Uint8Array;
  /** Sector index → versions written or punched since the last sync (oldest first). */
  readonly unsynced = new Map<number, Version[]>();

  constructor(size = 0) {
    this.durable = Buffer.alloc(size);
    this.visible = Buffer.alloc(size);
    this.durableHole = new Uint8Array(Math.ceil(size / SECTOR));
    this.visibleHole = new Uint8Array(Math.ceil(size / SECTOR));
  }

  get size(): number {
    return this.visible.byteLength;
  }

  /** Grows the file; the new sectors are allocated zeros, or holes with `sparse`. */
  resize(size: number, sparse = false): void {
    if (size <= this.visible.byteLength) return;
    const sectors = Math.ceil(size / SECTOR);
    const grow = (holes: Uint8Array): Uint8Array => {
      const out = new Uint8Array(sectors).fill(sparse ? 1 : 0);
      out.set(holes);
      return out;
    };
    this.visibleHole = grow(this.visibleHole);
    this.durableHole = grow(this.durableHole);
    this.visible = Buffer.concat([this.visible, Buffer.alloc(size - this.visible.byteLength)]);
    this.durable = Buffer.concat([this.durable, Buffer.alloc(size - this.durable.byteLength)]);
  }

  write(buf: Uint8Array, position: number): void {
    this.resize(position + buf.byteLength);
    this.visible.set(buf, position);
    const first = Math.floor(position / SECTOR);
    const end = Math.ceil((position + buf.byteLength) / SECTOR);
    for (let s = first; s < end; s++) {
      this.visibleHole[s] = 0;
      this.#record(s, Buffer.from(this.visible.subarray(s * SECTOR, (s + 1) * SECTOR)));
    }
  }

  /** Sectors wholly inside the range become holes; the parts of others are written with zeros. */
  punch(position: number, length: number): void {
    const end = Math.min(position + length, this.size);
    for (let s = Math.floor(position / SECTOR); s * SECTOR < end; s++) {
      const from = Math.max(position, s * SECTOR);
      const to = Math.min(end, (s + 1) * SECTOR);
      this.visible.fill(0, from, to);
      if (from === s * SECTOR && to === (s + 1) * SECTOR) {
        this.visibleHole[s] = 1;
        this.#record(s, null);
      } else if (!this.visibleHole[s]) {
        this.#record(s, Buffer.from(this.visible.subarray(s * SECTOR, (s + 1) * SECTOR)));
      }
    }
  }

  read(buf: Uint8Array, position: number): number {
    const n = Math.max(0, Math.min(buf.byteLength, this.visible.byteLength - position));
    buf.set(this.visible.subarray(position, position + n));
    return n;
  }

  sync(): void {
    for (const s of this.unsynced.keys()) {
      this.visible.copy(this.durable, s * SECTOR, s * SECTOR, (s + 1) * SECTOR);
      this.durableHole[s] = this.visibleHole[s]!;
    }
    this.unsynced.clear();
  }

  crash(kind: CrashKind, rng: Rng): void {
    for (const [s, versions] of this.unsynced) {
      const pick = kind === 'process' ? versions.length : rng.int(versions.length + 1);
      if (pick === 0) continue;
      const v = versions[pick - 1]!;
      if (v === null) {
        this.durable.fill(0, s * SECTOR, (s + 1) * SECTOR);
        this.durableHole[s] = 1;
      } else {
        v.copy(this.durable, s * SECTOR);
        this.durableHole[s] = 0;
      }
    }
    this.unsynced.clear();
    this.visible = Buffer.from(this.durable);
    this.visibleHole = Uint8Array.from(this.durableHole);
  }

  /** Bytes of allocated sectors now. */
  allocatedBytes(): number {
    let n = 0;
    for (let s = 0; s < this.visibleHole.length; s++) if (!this.visibleHole[s]) n++;
    return n * SECTOR;
  }

  /** Whether any sector of [position, position + length) is a hole now. */
  hasHole(position: number, length: number): boolean {
    for (let s = Math.floor(position / SECTOR); s * SECTOR < Math.min(position + length, this.size); s++) if (this.visibleHole[s]) return true;
    return false;
  }

  /** The first allocated run at or after `position`, as [start, end) bytes (SEEK_DATA, SEEK_HOLE). */
  nextData(position: number): [number, number] | null {
    let s = Math.floor(position / SECTOR);
    while (s < this.visibleHole.length && this.visibleHole[s]) s++;
    if (s >= this.visibleHole.length) return null;
    let e = s;
    while (e < this.visibleHole.length && !this.visibleHole[e]) e++;
    return [Math.max(position, s * SECTOR), Math.min(this.size, e * SECTOR)];
  }

  #record(s: number, version: Version): void {
    const list = this.unsynced.get(s);
    if (list) list.push(version);
    else this.unsynced.set(s, [version]);
  }
}

/** The world of files one test sequence runs in. */
export class CrashWorld {
  readonly files = new Map<string, ModelFile>();
  /** Persistence points passed so far. */
  ops = 0;
  /** Crash when `ops` reaches this number (Infinity: never). */
  crashAt = Infinity;
  crashed = false;
  /** Crashes so far: I/O a process began before one of them belongs to that dead process. */
  generation = 0;
  /** What storage().freeBytes() answers. */
  freeBytes = 2 ** 40;
  /**
   * Per metadata path, dirty-intent transactions written to the WAL but not synced yet
   * (Metadata.addDirtyUnsynced), oldest first. The real database has not seen them: a sync, or a
   * later synced transaction, applies them; a crash keeps a prefix of them (SQLite recovers the
   * WAL up to the last frame it can verify): all of them for a process crash, a random number for
   * a power loss.
   */
  readonly unsyncedIntents = new Map<string, Extent[][]>();

  /** Called before every persistence point; throws once the crash point is reached. */
  point(): void {
    if (this.crashed) throw new SimulatedCrash();
    if (this.ops >= this.crashAt) {
      this.crashed = true;
      throw new SimulatedCrash();
    }
    this.ops++;
  }

  armCrash(after: number): void {
    this.crashAt = this.ops + after;
  }

  /** Loses unsynced data as the kind of crash would, and lets the world run again. */
  crash(kind: CrashKind, rng: Rng): void {
    for (const f of this.files.values()) f.crash(kind, rng);
    for (const [path, txns] of this.unsyncedIntents) {
      const kept = kind === 'process' ? txns.length : rng.int(txns.length + 1);
      if (kept > 0) {
        const m = Metadata.open(path);
        try {
          for (const extents of txns.slice(0, kept)) m.addDirty(extents);
        } finally {
          m.close();
        }
      }
    }
    this.unsyncedIntents.clear();
    this.generation++;
    this.crashed = false;
    this.crashAt = Infinity;
  }

  file(path: string): ModelFile {
    const f = this.files.get(path);
    if (!f) throw new Error(`no model file ${path}`);
    return f;
  }

  /** Storage over model files; paths it does not hold (the SQLite metadata) go to the real fs. */
  storage(): Storage {
    const world = this;
    return {
      async open(path: string, options: OpenOptions = {}): Promise<BlockFile> {
        let f = world.files.get(path);
        if (options.create) {
          if (f) throw Object.assign(new Error(`EEXIST: ${path}`), { code: 'EEXIST' });
          f = new ModelFile();
          world.files.set(path, f);
        }
        if (!f) throw Object.assign(new Error(`ENOENT: ${path}`), { code: 'ENOENT' });
        return new ModelHandle(world, path, f, options.readOnly ?? false);
      },
      async exists(path: string): Promise<boolean> {
        return world.files.has(path) || posixStorage.exists(path);
      },
      async remove(path: string): Promise<void> {
        if (world.files.delete(path)) return;
        await posixStorage.remove(path);
      },
      async syncDir(): Promise<void> {
        world.point();
      },
      async freeBytes(): Promise<number> {
        return world.freeBytes;
      },
    };
  }

  /**
   * Metadata whose every transaction is a persistence point. Unsynced intent transactions
   * (addDirtyUnsynced) are held back from the real database until syncWal() or the next synced
   * transaction, so a crash can lose them as the real WAL could (see unsyncedIntents).
   */
  metadata(): MetadataFactory {
    const world = this;
    const wrap = (m: Metadata): Metadata => {
      const addDirty = m.addDirty.bind(m);
      /**
       * Applies the first `count` held-back intents (all by default): a synced transaction makes
       * every earlier one durable, a WAL sync those written before it was called.
       */
      const settle = (count = Infinity) => {
        const txns = world.unsyncedIntents.get(m.path) ?? [];
        const settled = txns.splice(0, count);
        if (txns.length === 0) world.unsyncedIntents.delete(m.path);
        for (const extents of settled) addDirty(extents);
      };
      for (const name of ['addDirty', 'replaceDirty', 'setState', 'setMode', 'setCleanShutdown', 'upgrade', 'setBudget', 'saveClock'] as const) {
        const original = (m[name] as (...args: unknown[]) => void).bind(m);
        (m as unknown as Record<string, unknown>)[name] = (...args: unknown[]) => {
          world.point();
          settle();
          original(...args);
        };
      }
      m.addDirtyUnsynced = (extents) => {
        world.point();
        const txns = world.unsyncedIntents.get(m.path) ?? [];
        txns.push(extents.map((e) => ({ ...e })));
        world.unsyncedIntents.set(m.path, txns);
      };
      m.syncWal = async () => {
        // An fsync covers what was written before it started, not what the event loop writes
        // while it runs on another thread (that may or may not reach the disk with it).
        const before = world.unsyncedIntents.get(m.path)?.length ?? 0;
        const generation = world.generation;
        await new Promise((resolve) => setImmediate(resolve));
        // A sync of the crashed process (its store abandoned, its connection closed) resuming
        // after the crash: the crash already decided which of its transactions survived, and the
        // intents held back now are the next process's (settling them through this closed
        // connection lost them). It never returns.
        if (world.generation !== generation) throw new SimulatedCrash();
        world.point();
        settle(before);
      };
      return m;
    };
    return {
      create: (path, identity, mode, space) => wrap(Metadata.create(path, identity, mode, space)),
      open: (path) => wrap(Metadata.open(path)),
    };
  }
}

class ModelHandle implements BlockFile {
  readonly path: string;
  readonly #world: CrashWorld;
  readonly #file: ModelFile;
  readonly #readOnly: boolean;
  #closed = false;

  constructor(world: CrashWorld, path: string, file: ModelFile, readOnly: boolean) {
    this.#world = world;
    this.path = path;
    this.#file = file;
    this.#readOnly = readOnly;
  }

  async read(buf: Uint8Array, position: number): Promise<number> {
    this.#check();
    if (this.#world.crashed) throw new SimulatedCrash();
    return this.#file.read(buf, position);
  }

  async write(buf: Uint8Array, position: number): Promise<void> {
    this.#check();
    if (this.#readOnly) throw Object.assign(new Error('EBADF'), { code: 'EBADF' });
    this.#world.point();
    this.#file.write(Buffer.from(buf), position);
  }

  /**
   * BlockFile.writeNow: write() done in the calling turn, one persistence point as write() is.
   * Declines (false, nothing written) on a closed or read-only handle and at or after the crash
   * point, so the caller's write() meets the crash there.
   */
  writeNow(buf: Uint8Array, position: number): boolean {
    const world = this.#world;
    if (this.#closed || this.#readOnly || world.crashed || world.ops >= world.crashAt) return false;
    world.point();
    this.#file.write(Buffer.from(buf), position);
    return true;
  }

  async sync(): Promise<void> {
    this.#check();
    this.#world.point();
    this.#file.sync();
  }

  async allocate(length: number): Promise<void> {
    this.#check();
    this.#world.point();
    this.#file.resize(length);
  }

  async truncate(length: number): Promise<void> {
    this.#check();
    this.#world.point();
    this.#file.resize(length, true);
  }

  async punchHole(offset: number, length: number): Promise<void> {
    this.#check();
    if (this.#readOnly) throw Object.assign(new Error('EBADF'), { code: 'EBADF' });
    this.#world.point();
    this.#file.punch(offset, length);
  }

  zeroRange(offset: number, length: number): Promise<void> {
    return this.punchHole(offset, length);
  }

  async allocatedBytes(): Promise<number> {
    return this.#file.allocatedBytes();
  }

  async nextData(offset: number): Promise<[number, number] | null> {
    return this.#file.nextData(offset);
  }

  async size(): Promise<number> {
    return this.#file.size;
  }

  async close(): Promise<void> {
    this.#closed = true;
  }

  #check(): void {
    if (this.#closed) throw Object.assign(new Error('EBADF: closed'), { code: 'EBADF' });
  }
}
