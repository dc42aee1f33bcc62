// A crashable model of the files under the engine, for model-based crash tests.
//
// Each file keeps a durable image and, per 512-byte sector, the versions written since the last
// sync. A crash keeps, for every such sector independently, the durable version or any one of the
// versions written since (the page cache may have written any of them back, in any order), so
// unsynced writes are lost, kept, or torn at sector granularity. A "process" crash keeps all of
// them (the kernel's page cache survives a daemon's death).
//
// Every write, sync, allocate and metadata transaction is a persistence point: `crashAt` makes the
// n-th one throw SimulatedCrash before it takes effect, and every later one too.
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

export class ModelFile {
  durable: Buffer;
  visible: Buffer;
  /** Sector index → versions written since the last sync (oldest first). */
  readonly unsynced = new Map<number, Buffer[]>();

  constructor(size = 0) {
    this.durable = Buffer.alloc(size);
    this.visible = Buffer.alloc(size);
  }

  get size(): number {
    return this.visible.byteLength;
  }

  resize(size: number): void {
    if (size <= this.visible.byteLength) return;
    this.visible = Buffer.concat([this.visible, Buffer.alloc(size - this.visible.byteLength)]);
    this.durable = Buffer.concat([this.durable, Buffer.alloc(size - this.durable.byteLength)]);
  }

  write(buf: Uint8Array, position: number): void {
    this.resize(position + buf.byteLength);
    this.visible.set(buf, position);
    const first = Math.floor(position / SECTOR);
    const end = Math.ceil((position + buf.byteLength) / SECTOR);
    for (let s = first; s < end; s++) {
      const version = Buffer.from(this.visible.subarray(s * SECTOR, (s + 1) * SECTOR));
      const list = this.unsynced.get(s);
      if (list) list.push(version);
      else this.unsynced.set(s, [version]);
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
    }
    this.unsynced.clear();
  }

  crash(kind: CrashKind, rng: Rng): void {
    for (const [s, versions] of this.unsynced) {
      const pick = kind === 'process' ? versions.length : rng.int(versions.length + 1);
      if (pick > 0) versions[pick - 1]!.copy(this.durable, s * SECTOR);
    }
    this.unsynced.clear();
    this.visible = Buffer.from(this.durable);
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
      /** Applies the held-back intents: a synced transaction or a WAL sync makes them durable. */
      const settle = () => {
        const txns = world.unsyncedIntents.get(m.path) ?? [];
        world.unsyncedIntents.delete(m.path);
        for (const extents of txns) addDirty(extents);
      };
      for (const name of ['addDirty', 'replaceDirty', 'setState', 'setMode', 'setCleanShutdown'] as const) {
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
        // The real fsync runs on another thread: whatever the event loop does meanwhile may
        // reach the files first.
        await new Promise((resolve) => setImmediate(resolve));
        world.point();
        settle();
      };
      return m;
    };
    return {
      create: (path, identity, mode) => wrap(Metadata.create(path, identity, mode)),
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
