// /dev/uloopN: the kernel module (kernel/uloop.c) serves hits from the cache file itself; this
// frontend is its daemon. It ADDs the device, or ATTACHes to it when a daemon of the same command
// died and left it (kill -9, a crash: the kernel keeps the device and re-issues what was not
// answered), reads the kernel's upcalls and runs them through UpcallHandler (src/bdev/upcalls.ts:
// misses, intents, barriers, preserves), replies, and watches the device's sticky error.
import { closeSync, existsSync, openSync, readFileSync } from 'node:fs';
import { release } from 'node:os';
import { errnoInfo } from '../errno.js';
import type { Logger } from 'pino';
import { Bitmap } from '../cache/bitmap.js';
import type { CacheEngine, ExternalEpochs } from '../cache/engine.js';
import type { Extent } from '../cache/layout.js';
import { DeviceBusyError, EngineClosedError, ModuleVersionError } from '../errors.js';
import type { SectorSize } from '../source/source.js';
import { alignedBuffer } from '../native/io.js';
import * as native from '../native/uloop.js';
import type { Frontend } from './frontend.js';
import { run } from './programs.js';
import { markStart, modprobe } from '../sys.js';
import { NO_UNIT_FILLS, UnitFiller, unitFillWanted, type UnitFillStats } from './unit-fill.js';
import { UpcallHandler, type Upcall, type UpcallType } from './upcalls.js';
import { freeUloop, moduleMissing, moduleRejected, uloopError } from './uloop-errors.js';

/**
 * Makes sure /dev/uloop-control exists: when it does not, loads the installed module (DKMS puts it
 * in /lib/modules/$(uname -r)/updates/dkms) with `modprobe uloop`, as a sysadmin would.
 * Throws ModuleRejectedError when the kernel refuses the module's signature (Secure Boot), and
 * ModuleMissingError when no module is installed for the running kernel or modprobe fails otherwise;
 * each message is one line pointing to docs/laptop.md.
 */
export function assertUloopModule(device: string): void {
  if (existsSync(native.ULOOP_CONTROL)) return;
  const r = modprobe('uloop');
  if (r.ok && existsSync(native.ULOOP_CONTROL)) return;
  const said = r.ran ? r.said : '';
  const rejected = moduleRejected(device, said, lockedDown());
  if (rejected) throw rejected;
  if (!r.ran || /not found/i.test(said) || r.ok) throw moduleMissing(device, `not installed for kernel ${release()}`);
  throw moduleMissing(device, `modprobe uloop: ${said || `exit ${String(r.status)}`}`);
}

/** True when /sys/kernel/security/lockdown selects integrity or confidentiality. */
function lockedDown(): boolean {
  try {
    return /\[(integrity|confidentiality)\]/.test(readFileSync('/sys/kernel/security/lockdown', 'utf8'));
  } catch {
    return false;
  }
}

export interface UloopOptions {
  device: string;
  engine: CacheEngine;
  readOnly: boolean;
  logger: Logger;
  /** The backing disk's sectors, given to the device at ADD (default 512/512). */
  sectorSize?: SectorSize;
  /** How often the kernel's counters and sticky error are looked at (ms). Default 200. */
  pollMs?: number;
  /** How often CLEAR_ERROR is tried while the sticky error lasts (ms). Default 2000. */
  clearErrorMs?: number;
}

/**
 * The kernel's side of a /dev/uloopN as `status` shows it (QUERY, exact running counts). The unit
 * fill's counters (src/bdev/unit-fill.ts: the rest of the eviction unit made present
 * around an answered MISS, when the disk was idle or the reader sequential) are zeros without a
 * budget, with a module without CLAIM, and with ULOBDEV_UNIT_FILL=0.
 */
export interface UloopStatus extends UnitFillStats {
  /** How this daemon got the device: 'added' (ADD) or 'reattached' (ATTACH after a dead daemon). */
  attach: 'added' | 'reattached';
  presentBlocks: number;
  dirtyBlocks: number;
  pendingBlocks: number;
  zeroBlocks: number;
  /** Upcalls queued or sent and not answered. */
  waiting: number;
  /** The sticky error of a failed cache-file sync (e.g. 'EIO'), or null. */
  error: string | null;
  readHits: number;
  readMisses: number;
  writeHits: number;
  writeUpcalls: number;
  flushes: number;
  barriers: number;
  timeouts: number;
  ioErrors: number;
  /** Upcalls this daemon answered with an error. */
  failedUpcalls: number;
  /** PRESERVE upcalls answered: blocks' epoch versions kept before the kernel let them change. */
  preserves: number;
  /** When the last user request was served, as far as the kernel's counters tell (ms since epoch). */
  lastRequestAt: number;
}

/** A frontend of a kernel module that keeps block state itself; status and policy read it. */
export interface UloopFrontend extends Frontend {
  readonly kind: 'uloop';
  /** The kernel's counts now (one QUERY), or null once the device is gone. */
  kernelStatus(): UloopStatus | null;
  /**
   * Hydration of bytes [offset, offset + length) through the kernel: CLAIM the blocks it has
   * neither present, dirty nor busy (requests touching them wait), fill those from the source,
   * sync, FILLED (the kernel serves them), record them present. Blocks the kernel holds newer
   * (written, pending for the next barrier) are never claimed, so never overwritten.
   */
  hydrateFill(offset: number, length: number): Promise<void>;
}

const TYPES: Record<number, UpcallType> = {
  [native.ULOOP_MSG_MISS]: 'miss',
  [native.ULOOP_MSG_INTENT]: 'intent',
  [native.ULOOP_MSG_BARRIER]: 'barrier',
  [native.ULOOP_MSG_PRESERVE]: 'preserve',
  [native.ULOOP_MSG_ZERO]: 'zero',
  [native.ULOOP_MSG_ROOM]: 'room',
};

/** QUERY of /dev/uloopN, or null when there is no such device (ENODEV). */
function queryOrNull(ctl: number, index: number): native.UloopInfo | null {
  try {
    return native.uloopQuery(ctl, index);
  } catch (err) {
    if ((err as { code?: string }).code === 'ENODEV') return null;
    throw err;
  }
}

/**
 * Why an existing /dev/uloopN cannot be this cache's device (its size, block size, mode or
 * sectors differ), or null when it can be taken back.
 */
export function uloopMismatch(
  info: Pick<native.UloopInfo, 'size' | 'blockSize' | 'flags' | 'logicalBlockSize'> & Partial<Pick<native.UloopInfo, 'unitShift'>>,
  want: { size: number; blockSize: number; writeback: boolean; logical: number; unitShift?: number | null },
): string | null {
  const diffs: string[] = [];
  // A budget needs the kernel's accessed bits per eviction unit (ULOOP_F_ACCESSED at ADD).
  if (want.unitShift !== undefined && want.unitShift !== null) {
    if ((info.flags & native.ULOOP_F_ACCESSED) === 0) diffs.push('added without a cache budget, asked with one');
    else if (info.unitShift !== undefined && info.unitShift !== want.unitShift) diffs.push(`eviction unit of ${2 ** info.unitShift} blocks, this cache ${2 ** want.unitShift}`);
  }
  if (info.size !== want.size) diffs.push(`size ${info.size} bytes, this disk ${want.size}`);
  if (info.blockSize !== want.blockSize) diffs.push(`block size ${info.blockSize}, this cache ${want.blockSize}`);
  const wb = (info.flags & native.ULOOP_F_WRITEBACK) !== 0;
  if (wb !== want.writeback) diffs.push(wb ? 'added with --writeback, asked without' : 'added read-only, asked with --writeback');
  if (info.logicalBlockSize !== 0 && info.logicalBlockSize !== want.logical) diffs.push(`${info.logicalBlockSize}-byte sectors, this disk ${want.logical}`);
  return diffs.length ? diffs.join('; ') : null;
}

/** The flush-epoch ioctls of an attached device, as kernelEpochs() uses them. */
export interface KernelEpochIoctls {
  /** EPOCH_BEGIN: the kernel's dirty bitmap into `dirty`; returns the epoch. */
  begin(dirty: Buffer): number;
  /** EPOCH_COMMIT: narrows `flushed` in place to what the kernel cleared. Throws ESTALE, ECANCELED, EIO. */
  commit(epoch: number, flushed: Buffer): void;
  /** QUERY's dirty count. */
  dirtyBlocks(): number;
  /** True once the device is removed. */
  gone(): boolean;
  /** For messages: /dev/uloop0. */
  device: string;
  /** QUERY's zero and pending counts (with dirtyBlocks: the budget flush's dirty data). */
  zeroAndPending?(): { zeroBlocks: number; pendingBlocks: number };
  /** A FLUSH of the device: the kernel's pending blocks reach the store in its barrier. */
  flush?(): Promise<void>;
  /**
   * EVICT of the blocks set in `bits` (bit i: block first + i), narrowed in place; returns their
   * count. `pinned`: also those of requests still preparing (ULOOP_EVICT_F_PINNED, a last resort).
   */
  evict?(first: number, count: number, bits: Buffer, pinned?: boolean): number;
  /**
   * EVICT with ULOOP_EVICT_F_HOLD: as evict, and the evicted blocks stay busy as claim `id` (0:
   * none) until letGo(id, first, count) after the punch.
   */
  evictHeld?(first: number, count: number, bits: Buffer, pinned?: boolean): { done: number; id: number };
  /** ACCESSED of units [first, first + count) into `bits`, cleared in the kernel; returns the count set. */
  accessed?(first: number, count: number, bits: Buffer): number;
  /**
   * CLAIM of blocks [first, first + count): those the kernel holds neither present, dirty nor busy
   * into `bits` (requests touching them wait); returns the claim's id, 0 when none.
   */
  claim?(first: number, count: number, bits: Buffer): number;
  /** FILLED of claim `id` with no block set: the claimed blocks are let go, still missing. */
  letGo?(id: number, first: number, count: number): void;
}

/**
 * Flush epochs (rule 7) on both sides. The kernel writes hits itself and keeps its own dirty bits:
 * the flushed set is the store's snapshot narrowed to blocks dirty in the kernel too (a block whose
 * barrier the store has not recorded yet waits for the next epoch). At commit the kernel clears
 * first, the store (clearFlushed) right after in the same tick: a write to a cleared block then
 * waits for an INTENT that is answered only once the store has cleared it too. With
 * ULOOP_F_PRESERVE the kernel holds the first write to a block of the epoch until the daemon has
 * kept its epoch version aside: `preserve` runs engine.preserveEpochBlocks (the userspace path's
 * copy-on-write) for the epoch the engine has open; the engine opens it in the same tick as
 * EPOCH_BEGIN (beginEpoch), so a PRESERVE never finds it missing. Once the device is removed the
 * store holds all its bits (detach sends a FLUSH first), but an epoch begun in the kernel cannot
 * be committed without it: its rewritten blocks are unknown.
 */
export function kernelEpochs(engine: CacheEngine, k: KernelEpochIoctls, log?: (line: string, err: unknown) => void) {
  const bytes = Math.ceil(engine.geometry.blockCount / 8);
  let open = 0; // the kernel epoch the engine's open flush epoch belongs to; 0: none
  let preserves = 0;
  /** Ends a kernel epoch, clearing nothing (COMMIT of an empty set, uloop.h). */
  const end = (epoch: number) => {
    try {
      k.commit(epoch, Buffer.alloc(bytes));
    } catch {
      // ESTALE: a later BEGIN ended it already; EIO: the sticky error (the next BEGIN ends it).
    }
  };
  const external: ExternalEpochs = {
    begin(flushing) {
      open = 0;
      if (k.gone()) return;
      const kernel = Buffer.alloc(flushing.buffer.byteLength);
      open = k.begin(kernel);
      flushing.and(kernel);
    },
    commit(cleaned) {
      const epoch = open;
      open = 0;
      if (epoch === 0) return;
      if (k.gone()) throw new EngineClosedError(`${k.device} was removed during the flush; its blocks stay dirty for the next one`);
      k.commit(epoch, cleaned.buffer);
    },
    abort() {
      const epoch = open;
      open = 0;
      if (epoch !== 0 && !k.gone()) end(epoch);
    },
    dirtyBlocks() {
      if (k.gone()) return null;
      try {
        return k.dirtyBlocks();
      } catch {
        return null;
      }
    },
  };
  if (k.flush && k.zeroAndPending) {
    const { flush, zeroAndPending } = k;
    // A flush epoch first takes the kernel's pending blocks (written whole while missing) into the
    // store with a FLUSH, so the flush writes them back and a budget flush makes them evictable.
    external.beforeEpoch = async () => {
      if (!k.gone() && zeroAndPending().pendingBlocks > 0) await flush();
    };
    external.dirtyDataBlocks = () => {
      if (k.gone()) return null;
      try {
        const dirty = k.dirtyBlocks();
        return dirty - zeroAndPending().zeroBlocks;
      } catch {
        return null;
      }
    };
  }
  const clock = engine.store.clock;
  if (clock && k.evict && k.accessed) {
    const { evict, accessed } = k;
    const max = native.ULOOP_MAX_RANGE_BLOCKS;
    // The hand harvests the kernel's accessed bits (hits it served) as it moves (cache/clock.ts).
    external.harvestAccessed = () => {
      if (k.gone()) return;
      for (let first = 0; first < clock.units; first += max) {
        const count = Math.min(max, clock.units - first);
        const bits = Buffer.alloc(Math.ceil(count / 8));
        if (accessed(first, count, bits) > 0) clock.mergeAccessed(bits, first);
      }
    };
    /**
     * EVICT of the clock's victims, in ranges of at most ULOOP_MAX_RANGE_BLOCKS: the kernel stops
     * serving those present, clean, idle and not pending, waits until no request is in flight on
     * them, and returns them; only those are evicted from the store (then cleared durably, then
     * punched: invariant 1). A failed call evicts nothing of its range.
     */
    // ULOOP_EVICT_F_HOLD: claims holding what the last evict let go, until the store has punched.
    const MAX_HELD = 32;
    const held: Array<{ id: number; first: number; count: number }> = [];
    const { evictHeld, letGo } = k;
    external.evict = (victims, pinned = false) => {
      const gone: Extent[] = [];
      if (k.gone()) return gone;
      // Pieces of at most one range each (victims lie within eviction units, so they always fit).
      const pieces: Extent[] = [];
      for (const e of victims) for (let b = e.start; b < e.start + e.count; b += max) pieces.push({ start: b, count: Math.min(max, e.start + e.count - b) });
      pieces.sort((x, y) => x.start - y.start);
      for (let i = 0; i < pieces.length; ) {
        // review9 K-A2: each held EVICT is a claim until the punch, and the kernel allows 64
        // outstanding (hydration's CLAIMs among them): past MAX_HELD ranges the rest of the
        // victims stay (as if refused), and the engine picks other units in its next call.
        if (evictHeld && letGo && held.length >= MAX_HELD) break;
        const first = pieces[i]!.start;
        let j = i + 1;
        while (j < pieces.length && pieces[j]!.start + pieces[j]!.count - first <= max) j++;
        const end = pieces[j - 1]!.start + pieces[j - 1]!.count;
        const bits = new Bitmap(end - first, Buffer.alloc(Math.ceil((end - first) / 8)));
        for (let x = i; x < j; x++) bits.setRange(pieces[x]!.start - first, pieces[x]!.start + pieces[x]!.count - first);
        try {
          let done: number;
          if (evictHeld && letGo) {
            const r = evictHeld(first, end - first, bits.buffer, pinned);
            done = r.done;
            if (r.id > 0) held.push({ id: r.id, first, count: end - first });
          } else {
            done = evict(first, end - first, bits.buffer, pinned);
          }
          if (done > 0) for (const r of bits.runs()) gone.push({ start: first + r.start, count: r.count });
        } catch (err) {
          log?.(`${k.device}: EVICT of blocks ${first}..${end - 1} failed (${(err as { code?: string }).code ?? 'error'}); nothing evicted there`, err);
        }
        i = j;
      }
      return gone;
    };
    // After the store's punch (or its failure): the held blocks go back to the kernel, missing.
    external.evicted = () => {
      for (const h of held.splice(0)) {
        if (k.gone()) continue;
        try {
          letGo?.(h.id, h.first, h.count);
        } catch (err) {
          // ENOENT: the claim ended already (a detach); nothing is held.
          log?.(`${k.device}: letting go of evicted blocks ${h.first}..${h.first + h.count - 1} failed (${(err as { code?: string }).code ?? 'error'})`, err);
        }
      }
    };
  }
  return {
    external,
    end,
    /**
     * After ATTACH to a device whose daemon died, before any upcall is read: the kernel's dirty
     * set (EPOCH_BEGIN, then an empty COMMIT that ends that epoch, clearing nothing; a begun epoch
     * of the dead daemon ends with it) reconciles the store (engine.reconcileOutsideDirty).
     * Then, range by range (ULOOP_MAX_RANGE_BLOCKS), the store's count is made to agree with the
     * kernel and the cache file:
     *  - `dropped`: blocks the store holds present and the kernel missing (a daemon killed
     *    between the kernel's EVICT and the store's, or during a recovery's drop). CLAIM finds
     *    them (and holds requests off them meanwhile), store.evict clears them durably and
     *    punches, FILLED with none set lets them go. Left present, the store counts them, the
     *    kernel refuses to EVICT them, and a budget full of them fails every miss ('flushes free
     *    nothing'; the uloop model's budget property). Their cache content is the disk's (clean),
     *    and the kernel reads none of it (a MISS comes first).
     *  - With a budget, `unknown`: blocks the kernel serves present and clean that the store does
     *    not hold (fills the dead daemon answered, the kernel marked present, and the daemon died
     *    before its commit recorded them). The store would never count them and the cache file
     *    would stay over the budget (uloop-budget: 16.77 MiB for 16 MiB). EVICT (PINNED: requests
     *    waiting for this daemon keep none but the oldest's; HOLD: they stay busy until the
     *    punch) takes them from the kernel, and they are punched: the next read fills them
     *    again. Not adopted: docs/design.md, "Re-attach and the budget".
     *  - With a budget, `leftover`: data in the cache file that neither side holds (an eviction
     *    cut between its bitmap sync and its punch, a fill written and never answered): CLAIM
     *    holds them and they are punched.
     * What is left uncounted (`remaining`) is data under blocks the kernel has busy (an upcall
     * sent again to this daemon, which records them once it answers) or in the oldest waiting
     * request's range. Returns the counts, in blocks.
     */
    async reconcile(): Promise<{ cleared: number; dropped: number; unknown: number; leftover: number; remaining: number }> {
      const kernel = new Bitmap(engine.geometry.blockCount, Buffer.alloc(bytes));
      end(k.begin(kernel.buffer));
      const cleared = await engine.reconcileOutsideDirty(kernel);
      const counts = { cleared, dropped: 0, unknown: 0, leftover: 0, remaining: 0 };
      const { claim, letGo, evictHeld } = k;
      if (!claim || !letGo) return counts;
      const store = engine.store;
      const blocks = engine.geometry.blockCount;
      const max = native.ULOOP_MAX_RANGE_BLOCKS;
      // With a budget: the cache file's data no present bit of the store covers (SEEK_DATA).
      const budgeted = store.budget !== null && evictHeld !== undefined;
      const uncounted = budgeted ? new Bitmap(blocks, Buffer.alloc(bytes)) : null;
      if (uncounted) for (const e of await store.uncountedData()) uncounted.setRange(e.start, e.start + e.count);
      for (let first = 0; first < blocks; first += max) {
        const count = Math.min(max, blocks - first);
        const last = first + count;
        const hasPresent = store.present.nextSet(first, last) < last;
        const hasUncounted = uncounted !== null && uncounted.nextSet(first, last) < last;
        if (!hasPresent && !hasUncounted) continue;
        const bits = new Bitmap(count, Buffer.alloc(Math.ceil(count / 8)));
        const id = claim(first, count, bits.buffer);
        let heldId = 0;
        try {
          const stale: Extent[] = [];
          for (const r of bits.runs()) {
            for (const p of store.present.runs(first + r.start, first + r.start + r.count)) {
              for (const c of store.dirty.gaps(p.start, p.start + p.count)) stale.push(c);
            }
          }
          if (stale.length > 0) {
            await store.evict(stale);
            counts.dropped += stale.reduce((n, e) => n + e.count, 0);
          }
          if (!uncounted || !hasUncounted) continue;
          // Data the store does not count: claimed (the kernel holds it neither present, dirty
          // nor busy) is a leftover; the rest the kernel may serve: EVICT those present and clean.
          const ask = new Bitmap(count, Buffer.alloc(Math.ceil(count / 8)));
          for (const r of uncounted.runs(first, last)) ask.setRange(r.start - first, r.start - first + r.count);
          for (const r of bits.runs()) ask.clearRange(r.start, r.start + r.count);
          // Dirty in the kernel (pending: written whole while missing) is the kernel's unasked
          // count, which the credit counts as outside the store; EVICT would refuse it anyway.
          for (const r of kernel.runs(first, last)) ask.clearRange(r.start - first, r.start - first + r.count);
          let evicted: Bitmap | null = null;
          if (ask.nextSet(0) < count) {
            try {
              const r = evictHeld!(first, count, ask.buffer, true);
              heldId = r.id;
              if (r.done > 0) evicted = ask;
            } catch (err) {
              // EINTR, EAGAIN: nothing evicted there; those blocks stay uncounted (`remaining`).
              log?.(`${k.device}: EVICT of blocks ${first}..${last - 1} at re-attach failed (${(err as { code?: string }).code ?? 'error'}); what the dead daemon filled there stays uncounted`, err);
            }
          }
          const punch: Extent[] = [];
          let n = 0;
          for (const r of uncounted.runs(first, last)) {
            for (let b = r.start; b < r.start + r.count; b++) {
              const i = b - first;
              if (bits.get(i)) counts.leftover++;
              else if (evicted?.get(i)) counts.unknown++;
              else {
                if (!kernel.get(b)) counts.remaining++;
                continue;
              }
              const tail = punch[punch.length - 1];
              if (tail && tail.start + tail.count === b) tail.count++;
              else punch.push({ start: b, count: 1 });
              n++;
            }
          }
          if (n > 0) await store.punchUncounted(punch);
        } finally {
          if (id !== 0) letGo(id, first, count);
          if (heldId !== 0) letGo(heldId, first, count);
        }
      }
      if (counts.dropped + counts.unknown + counts.leftover > 0) store.notifySpace();
      return counts;
    },
    /** PRESERVE of blocks [first, end) for kernel epoch `epoch`; an epoch that has ended needs nothing. */
    async preserve(epoch: number, first: number, last: number): Promise<void> {
      if (epoch !== open) return;
      preserves++;
      await engine.preserveEpochBlocks(first, last);
    },
    preserves: () => preserves,
  };
}

/** CREDIT of an attached device, as kernelCredit() uses it. */
export interface KernelCreditIoctl {
  /** CREDIT: sets the limit in blocks (-1: none); returns it and the kernel's unasked blocks. */
  credit(limit: number): { limit: number; unasked: number };
  /** QUERY's credit_limit: the limit the kernel holds now (-1: none). */
  limit?(): number;
  /** True once the device is removed. */
  gone(): boolean;
}

/**
 * The budget's policy for what the kernel writes without asking (ULOOP_FEAT_CREDIT). The kernel
 * writes missing blocks a write covers whole itself (rule 4); they reach the store only at the
 * next barrier. Its credit bounds them: the blocks pending, handed to a barrier in flight, owned
 * by writes in flight, lost, or granted by ROOM and not yet taken ("unasked", U) stay within the
 * limit L, and a write that would pass it sends ROOM and waits.
 * The store counts U as used (store.outsideBlocks, exact at each CREDIT call, which returns it),
 * so what the kernel can hold beyond the store's count is L - U. L is a consumable credit of at
 * most one eviction unit: update() (every look at the kernel) raises it back to one unit only
 * while the store's count leaves that much room in the budget, and a barrier that records n of the
 * kernel's blocks present lowers it by n before it is answered (handedOver: U drops by n only at
 * the answer, so a barrier gives the kernel no room by itself). So the cache file holds at most
 * the budget plus one unit. Past that a write sends ROOM: room() reserves its blocks as a fill
 * would (engine.reserveSpace: evict, commit, flush; the write waits meanwhile, back-pressure) and
 * in one tick raises L by them and counts them as outside as store.release gives the reservation
 * back (nothing counted twice; the grant is inside the kernel's limit). update() gives back what
 * L holds beyond max(one unit, U). Without a budget the limit stays off (what ATTACH leaves). The
 * only other excess: a single write larger than the whole budget (room() grants it the budget's
 * worth and the kernel takes the rest: requests are bounded).
 */
export function kernelCredit(engine: CacheEngine, k: KernelCreditIoctl) {
  const store = engine.store;
  const blocks = engine.geometry.blockCount;
  const share = Math.min(blocks, store.unitBlocks);
  let limit = 0;
  /**
   * Takes the kernel's own limit (QUERY) into `limit` (review9 K-E): a request's second ROOM
   * raises the kernel's limit by the new grant less the one it had, this side's copy by the whole
   * grant; written back, the copy would raise the kernel's limit past the credit. Nothing else
   * changes the kernel's limit between this and the CREDIT that follows: the answers and CREDIT
   * both run on this thread.
   */
  const mirror = () => {
    if (!k.limit) return;
    const now = k.limit();
    if (now >= 0) limit = now;
  };
  /** CREDIT to `want`; the store counts what the kernel holds unasked (+ `extra` about to be granted, - `gone` just recorded). Returns U. */
  const set = (want: number, extra = 0, gone = 0) => {
    limit = Math.max(0, Math.min(want, blocks));
    const r = k.credit(limit);
    store.outsideBlocks = Math.max(0, r.unasked + extra - gone);
    return r.unasked;
  };
  return {
    /** The limit now (blocks). */
    limit: () => limit,
    /** At attach and at each look at the kernel: the count exact; the limit back to one unit if the budget has room for it, or down to max(one unit, U). */
    update(): void {
      if (k.gone()) return;
      mirror();
      const unasked = set(limit);
      if (limit < share) {
        // What the caller's evictAhead frees lets it grow at a later look.
        const room = store.budgetBlocks - store.usedBlocks - (limit - unasked);
        if (room > 0) set(limit + Math.min(share - limit, room));
      } else if (limit > Math.max(share, unasked)) {
        set(Math.max(share, unasked));
      }
    },
    /**
     * ROOM for `n` blocks: resolves once the budget has room for them. The kernel raises its limit
     * by the grant when it takes the answer (ULOOP_FEAT_BARRIER), in the same step as it counts
     * the grant: raised here first, other writes could take that room before the grant was
     * counted (a 16 MiB budget's cache file at 20-21 MiB under review8 K1's buffered writer).
     * This side keeps its `limit` in step and counts the grant as outside the store now.
     */
    async room(n: number): Promise<void> {
      const want = Math.min(n, store.budgetBlocks);
      await engine.reserveSpace(want);
      if (!k.gone()) {
        limit = Math.min(limit + n, blocks);
        store.outsideBlocks += want;
      }
      store.release(want);
    },
    /** A barrier recorded `n` of the kernel's blocks present (not answered yet): they used up that much of the limit. */
    handedOver(n: number): void {
      if (k.gone()) {
        store.outsideBlocks = Math.max(0, store.outsideBlocks - n);
        return;
      }
      mirror();
      set(limit - n, 0, n);
    },
  };
}

/**
 * Refuses early, before any cache is opened or created (invariant 6), a /dev/uloopN that a live
 * daemon serves, or one left by a dead daemon whose size, mode or sectors differ from this
 * command's (the block size is checked again at attach, once the cache is open). A missing device
 * or module passes: ADD decides then. Throws DeviceBusyError.
 */
export function assertUloopAvailable(device: string, want: { size: number; writeback: boolean; logical: number }): void {
  let ctl: number;
  try {
    ctl = native.uloopOpen();
  } catch {
    return;
  }
  try {
    const info = queryOrNull(ctl, Number(device.slice('/dev/uloop'.length)));
    if (!info) return;
    refuseExisting(device, info, { ...want, blockSize: info.blockSize });
  } catch (err) {
    if (err instanceof DeviceBusyError) throw err;
  } finally {
    closeSync(ctl);
  }
}

/**
 * True when /dev/uloopN exists with no daemon attached (one died): the next attach takes it back,
 * and the kernel still serves the cache file meanwhile (CacheStore.open's servedByKernel).
 */
export function uloopAwaitsDaemon(device: string): boolean {
  let ctl: number;
  try {
    ctl = native.uloopOpen();
  } catch {
    return false;
  }
  try {
    const info = queryOrNull(ctl, Number(device.slice('/dev/uloop'.length)));
    return info !== null && !info.attached;
  } catch {
    return false;
  } finally {
    closeSync(ctl);
  }
}

function refuseExisting(device: string, info: native.UloopInfo, want: Parameters<typeof uloopMismatch>[1]): void {
  const free = () => {
    const f = freeUloop();
    return f ? `, e.g. ${f}` : '';
  };
  if (info.attached) throw new DeviceBusyError(`another daemon serves ${device}; detach it first, or pick a free one${free()}`);
  const why = uloopMismatch(info, want);
  if (why) throw new DeviceBusyError(`${device} exists without a daemon but is not this cache's device (${why}); attach it with its own command, or pick a free one${free()}`);
}

/**
 * Adds /dev/uloopN over the engine's cache file, or takes it back from a daemon that died (the
 * same command after kill -9: ATTACH, after checking the device is this cache's), and serves its
 * upcalls until detach(). Throws the errors of uloopError (module missing or of another ABI, N
 * taken, ...), DeviceBusyError when a live daemon serves N or N is another cache's device.
 */
export async function attachUloop(options: UloopOptions): Promise<UloopFrontend> {
  const { engine, logger } = options;
  const store = engine.store;
  const { blockSize, blockCount } = engine.geometry;
  const want = Number(options.device.slice('/dev/uloop'.length));
  const request = { device: options.device, size: engine.size, blockSize, cache: store.paths.cache };
  const sector = options.sectorSize ?? { logical: 512, physical: 512 };
  // A budget: the kernel sets an accessed bit per eviction unit (2^unitShift blocks) on each hit.
  const budgeted = store.budget !== null;
  const unitShift = budgeted ? Math.log2(store.unitBlocks) : null;

  let ctl: number;
  try {
    ctl = native.uloopOpen();
  } catch (err) {
    throw uloopError('open', err, request);
  }
  let cache = -1;
  let index = want;
  let attach: UloopStatus['attach'] = 'added';
  let features: native.UloopFeatures;
  let existing: native.UloopInfo | null;
  try {
    try {
      features = native.uloopGetFeatures(ctl);
    } catch (err) {
      // A module of ABI 1 has no GET_FEATURES (ENOTTY).
      throw new ModuleVersionError(`the loaded uloop module is older than this ulobdev (no GET_FEATURES: ${(err as Error).message}); rebuild and reload it (make -C kernel, then rmmod uloop and insmod kernel/uloop.ko once no /dev/uloopN is in use)`, { cause: err });
    }
    if (features.version !== native.ULOOP_ABI_VERSION) throw uloopError('ADD', Object.assign(new Error('EPROTO'), { code: 'EPROTO' }), request);
    const has = (f: number) => (features.features & f) !== 0;
    // CLAIM too: the re-attach's reconcile needs it (every module with BARRIER has it; review10 K-1).
    if (budgeted && !(has(native.ULOOP_FEAT.EVICT) && has(native.ULOOP_FEAT.ACCESSED) && has(native.ULOOP_FEAT.CREDIT) && has(native.ULOOP_FEAT.BARRIER) && has(native.ULOOP_FEAT.CLAIM))) {
      throw new ModuleVersionError(
        `the loaded uloop module cannot keep the cache file within a budget (no EVICT/ACCESSED/CREDIT/BARRIER/CLAIM), which --cache-size on ${options.device} needs; rebuild and reload it (make -C kernel), or use /dev/loopN`,
      );
    }
    existing = queryOrNull(ctl, want);
    // Zeroed blocks (dirty, not present) are the kernel's own with ULOOP_F_ZERO; added without it,
    // the module takes every dirty block as present: their zeros are written into the cache file first.
    const zeroInKernel = existing ? (existing.flags & native.ULOOP_F_ZERO) !== 0 : !options.readOnly && has(native.ULOOP_FEAT.ZERO);
    if (!zeroInKernel && store.zeroBlocks() > 0) await engine.materializeZeroed();
    if (existing) {
      // A device of this N survives its daemon: take it back if it is this cache's.
      refuseExisting(options.device, existing, { size: engine.size, blockSize, writeback: !options.readOnly, logical: sector.logical, unitShift });
      try {
        native.uloopAttach(ctl, want);
      } catch (err) {
        throw uloopError('ATTACH', err, request);
      }
      attach = 'reattached';
      markStart('ioctl');
    } else {
      cache = openSync(store.paths.cache, options.readOnly ? 'r' : 'r+');
      let flags = options.readOnly ? 0 : native.ULOOP_F_WRITEBACK;
      if (has(native.ULOOP_FEAT.PARTITIONS)) flags |= native.ULOOP_F_PARTSCAN;
      if (!options.readOnly && has(native.ULOOP_FEAT.PRESERVE)) flags |= native.ULOOP_F_PRESERVE;
      // DISCARD and WRITE_ZEROES become ZERO upcalls: the store's zeroed blocks, the same bits.
      if (zeroInKernel) flags |= native.ULOOP_F_ZERO;
      if (budgeted) flags |= native.ULOOP_F_ACCESSED;
      const sectors = has(native.ULOOP_FEAT.SECTOR_SIZE)
        ? { logicalBlockSize: sector.logical, physicalBlockSize: Math.min(Math.max(sector.physical, sector.logical), blockSize) }
        : {};
      try {
        index = native.uloopAdd(ctl, cache, { size: engine.size, blockSize, flags, index: want, unitShift: unitShift ?? 0, ...sectors }, store.present.buffer, store.dirty.buffer);
      } catch (err) {
        throw uloopError('ADD', err, request);
      }
      markStart('ioctl');
      // The kernel holds its own reference to the cache file from here on.
      closeSync(cache);
      cache = -1;
    }
  } catch (err) {
    if (cache >= 0) closeSync(cache);
    closeSync(ctl);
    throw err;
  }
  const device = `/dev/uloop${index}`;

  let removed = false;
  let closed = false;
  let failedUpcalls = 0;
  /**
   * The kernel syncs the cache file and hands its pending bits over in a barrier this process
   * answers. ULOOP_FEAT_BARRIER: the BARRIER ioctl on a worker thread, which touches no page
   * cache; its wait is killable, so a daemon killed meanwhile (kill -9, OOM) still exits and its
   * fd's release re-queues the upcall. A FLUSH of the device (coreutils `sync DEVICE`, in a
   * child, for an older module) writes back the device's page cache first: with a budget those
   * writes wait for a ROOM that this process answers only after this barrier (a cycle, broken
   * by io_timeout_s with lost writes), so a budget needs the ioctl (checked above).
   */
  // One BARRIER ioctl in flight at a time (later callers queue behind it): each blocks a libuv
  // pool thread until this process answers, and the answer needs pool threads too (review9 K-B).
  let barriers: Promise<void> = Promise.resolve();
  const flushDevice = (features.features & native.ULOOP_FEAT.BARRIER) !== 0
    ? () => {
        const next = barriers.catch(() => undefined).then(() => native.uloopBarrier(ctl).then(() => undefined));
        barriers = next;
        return next;
      }
    : () => run('sync', [device], { timeoutMs: 0 }).then(() => undefined);

  const epochs = kernelEpochs(
    engine,
    {
      begin: (dirty) => native.uloopEpochBegin(ctl, dirty),
      commit: (epoch, flushed) => native.uloopEpochCommit(ctl, epoch, flushed),
      dirtyBlocks: () => native.uloopQuery(ctl, index).dirtyBlocks,
      gone: () => removed,
      device,
      ...(options.readOnly ? {} : { zeroAndPending: () => native.uloopQuery(ctl, index), flush: () => flushDevice() }),
      ...(budgeted
        ? {
            evict: (first: number, count: number, bits: Buffer, pinned?: boolean) => native.uloopEvict(ctl, first, count, bits, pinned === true),
            ...((features.features & native.ULOOP_FEAT.BARRIER) !== 0
              ? { evictHeld: (first: number, count: number, bits: Buffer, pinned?: boolean) => native.uloopEvictHeld(ctl, first, count, bits, pinned === true) }
              : {}),
            accessed: (first: number, count: number, bits: Buffer) => native.uloopAccessed(ctl, first, count, bits) }
        : {}),
      ...((features.features & native.ULOOP_FEAT.CLAIM) !== 0
        ? {
            claim: (first: number, count: number, bits: Buffer) => native.uloopClaim(ctl, first, count, bits).id,
            letGo: (id: number, first: number, count: number) => void native.uloopFilled(ctl, id, first, count, Buffer.alloc(Math.ceil(count / 8))),
          }
        : {}),
    },
    (line, err) => logger.warn({ err }, line),
  );
  if (attach === 'reattached') {
    // Before the first upcall is read (the watch below): blocks the dead daemon's store kept dirty
    // and the kernel clean (killed between the two commits of an epoch, or an INTENT recorded and
    // never applied, which the kernel sends again) would never be flushed nor evicted.
    try {
      const { cleared: n, dropped, unknown, leftover, remaining } = await epochs.reconcile();
      if (n > 0) logger.warn({ blocks: n }, `${device}: ${n} blocks the dead daemon's store held dirty are clean in the kernel (written back, or an intent it sends again): cleared in the store`);
      if (dropped > 0) logger.warn({ blocks: dropped }, `${device}: ${dropped} blocks the dead daemon's store held present the kernel no longer serves (evicted there): evicted in the store`);
      if (unknown > 0) logger.warn({ blocks: unknown }, `${device}: ${unknown} blocks the dead daemon filled and never recorded were still served by the kernel: evicted there and punched (reads fetch them again)`);
      if (leftover > 0) logger.warn({ blocks: leftover }, `${device}: ${leftover} blocks of the cache file held data neither the store nor the kernel counts (an eviction cut before its punch): punched`);
      if (remaining > 0) logger.warn({ blocks: remaining }, `${device}: ${remaining} blocks of the cache file hold data the store does not count yet (under requests waiting for this daemon): they are counted once recorded, or go at the next ADD`);
    } catch (err) {
      logger.warn({ err }, `${device}: could not read the kernel's dirty set after re-attaching (${(err as { code?: string }).code ?? (err as Error).message}); blocks dirty only in the store stay dirty until the device is next added`);
    }
  }
  // With a budget the kernel's unasked whole-block writes are held to a credit (kernelCredit),
  // set before the first upcall is read (ATTACH lifted the dead daemon's).
  const credit =
    budgeted && !options.readOnly
      ? kernelCredit(engine, { credit: (limit) => native.uloopCredit(ctl, limit), limit: () => native.uloopQuery(ctl, index).creditLimit, gone: () => removed })
      : null;
  credit?.update();
  const handler = new UpcallHandler({
    engine,
    logger,
    device,
    port: {
      ...(credit ? { room: (n: number) => credit.room(n), handedOver: (n: number) => credit.handedOver(n) } : {}),
      barrierBlocks(id) {
        const bytes = Math.ceil(blockCount / 8);
        const present = Buffer.alloc(bytes);
        const dirty = new Bitmap(blockCount, Buffer.alloc(bytes));
        native.uloopBarrierBits(ctl, id, present, dirty.buffer);
        return dirty;
      },
      preserve: (epoch, first, end) => epochs.preserve(epoch, first, end),
    },
  });

  // Fills around a MISS (issue 12, power) through CLAIM/FILLED, so no block a writer touched is
  // overwritten: src/bdev/unit-fill.ts. On unless ULOBDEV_UNIT_FILL=0 (session 11 kept it off
  // after a guest Oops in uloop.ko; that was a reply reading a ROOM upcall after completing it,
  // fixed in session 12: test/vm/uloop-room-race.test.ts).
  const filler =
    (features.features & native.ULOOP_FEAT.CLAIM) !== 0 && unitFillWanted()
      ? new UnitFiller({
          engine,
          logger,
          device,
          port: {
            claim: (first, count, bits) => native.uloopClaim(ctl, first, count, bits).id,
            filled: (id, first, count, bits) => void native.uloopFilled(ctl, id, first, count, bits),
            maxBlocks: native.ULOOP_MAX_RANGE_BLOCKS,
            gone: () => removed || closed,
          },
        })
      : null;

  /** Replies unless the channel is closed (the fd may be reused then); logs what the kernel refused. */
  const reply = (m: native.UloopMessage, error: number) => {
    if (error < 0) failedUpcalls++;
    if (closed) return;
    try {
      native.uloopReply(ctl, m.id, error);
    } catch (err) {
      const code = (err as { code?: string }).code;
      // ENODEV: the device was removed meanwhile (detach REMOVEs, then waits for the upcalls
      // still running before it closes the fd); ENOENT: the kernel no longer waits for it.
      if (code === 'ENODEV' && removed) logger.debug({ id: m.id }, `${device}: reply to upcall ${m.id} after the device was removed: dropped`);
      else logger.warn({ err, id: m.id }, `${device}: the kernel refused the reply to upcall ${m.id} (${code ?? 'error'})`);
    }
  };

  let channelFailed = false;
  const watch = new native.UloopWatch(ctl, (err, msgs) => {
    if (err) {
      if (!removed && !channelFailed) logger.error({ err }, `${device}: the request channel failed (${err.code}); requests wait for the next daemon`);
      channelFailed = true;
      return;
    }
    for (const m of msgs) {
      const type = TYPES[m.type];
      if (!type) {
        logger.warn(`${device}: upcall ${m.id} of unknown type ${m.type}; answered EOPNOTSUPP`);
        reply(m, -95);
        continue;
      }
      const u: Upcall = { id: m.id, type, offset: m.offset, length: m.length, epoch: m.epoch };
      void handler.run(u).then((error) => {
        reply(m, error);
        // The rest of the miss's unit (or granule) while the disk spins, after the answer: the
        // request that asked does not wait for it.
        if (type === 'miss' && error === 0 && filler && !closed) filler.afterMiss(Math.floor(m.offset / blockSize), Math.min(blockCount, Math.ceil((m.offset + m.length) / blockSize)));
      });
    }
  });

  // Read-only too: with a budget the engine evicts through the kernel (EVICT) there as well.
  engine.externalEpochs = epochs.external;


  if (attach === 'reattached') {
    const info = existing!;
    logger.warn(
      { waiting: info.waiting, pending: info.pendingBlocks },
      `${device}: taken back from a daemon that died (${info.waiting} requests waiting for it, ${info.pendingBlocks} blocks for the next barrier)`,
    );
    // An epoch the dead daemon began cannot be committed: end it, so writes stop asking to preserve.
    if (info.state & native.ULOOP_STATE.EPOCH_OPEN) epochs.end(info.epoch);
    // The blocks the kernel held for the next barrier (written whole while missing) are in no
    // store yet: a FLUSH now hands them over to this daemon, before anything can remove the device.
    if (!options.readOnly && info.pendingBlocks > 0) {
      await flushDevice().catch((err: Error) => logger.warn(`${device}: the FLUSH after re-attaching failed (${err.message}); the kernel keeps those blocks for the next one`));
    }
  } else {
    logger.info('uloop device added');
  }

  // The kernel's counters, looked at every pollMs: requests it served without the daemon
  // count as user activity (the hydrator yields to them, the --on-ac flush waits for quiet), and
  // a failed sync of the cache file (the sticky error) is acted on.
  let lastRequestAt = 0;
  let served = -1;
  let stickyError = 0;
  let lastClearAt = 0;
  const poll = () => {
    if (removed) return;
    let q: native.UloopInfo;
    try {
      q = native.uloopQuery(ctl, index);
    } catch {
      return;
    }
    const n = q.readHits + q.readMisses + q.writeHits + q.writeUpcalls + q.flushes;
    if (served >= 0 && n !== served) {
      lastRequestAt = Date.now();
      engine.lastRequestAt = Math.max(engine.lastRequestAt, lastRequestAt);
    }
    served = n;
    if (budgeted) {
      // Whole blocks the kernel writes while missing take cache space the store learns of only at
      // the next barrier: the credit's limit (or what the kernel holds, if more) counts as used,
      // and room is made ahead. Read-only: nothing is written, pending counts what a dead
      // writable daemon's kernel still held.
      if (credit) credit.update();
      else store.outsideBlocks = q.unaskedBlocks;
      if (!store.failed) engine.evictAhead();
    }
    if (q.error === 0) stickyError = 0;
    else if (stickyError === 0 || Date.now() - lastClearAt >= clearErrorMs) clearStickyError(q.error);
    if (q.error === 0 && store.dataSyncFailed && !recovering && Date.now() - lastClearAt >= clearErrorMs) {
      lastClearAt = Date.now();
      recovering = true;
      void recoverStore().finally(() => {
        recovering = false;
      });
    }
  };
  /**
   * The sticky error: a sync of the cache file failed at a FLUSH, so pages written since the one
   * before may be gone; the kernel fails writes and FLUSH until CLEAR_ERROR. The daemon holds no
   * copy of what the kernel wrote, so there is nothing to write again: it asks the kernel to sync
   * again (it refuses while the cause lasts; tried again at the next poll), which then drops the
   * blocks the failed FLUSH would have handed over (the store never had them) and serves writes.
   * One line when it starts, one when it is cleared.
   */
  const clearStickyError = (error: number) => {
    if (stickyError === 0) {
      stickyError = error;
      logger.error(`${device}: a sync of the cache file ${store.paths.cache} failed (${errnoName(-error)}): writes and FLUSH fail with EIO until it syncs again; retrying every ${clearErrorMs / 1000} s`);
    }
    lastClearAt = Date.now();
    if (recovering) return;
    recovering = true;
    void (async () => {
      // The store's own fd sees the failed writeback once too (errseq): a sync now, while the
      // kernel refuses writes, so the fills it may have lost are dropped before writes resume.
      if (!store.failed) await store.syncData().catch(() => undefined);
      if (store.failed && !(await recoverStore())) return; // still failing: the next poll tries again
      const dropped = new Bitmap(blockCount, Buffer.alloc(Math.ceil(blockCount / 8)));
      let r: { error: number; dropped: number };
      try {
        r = native.uloopClearError(ctl, dropped.buffer);
      } catch {
        return; // EIO: still failing
      }
      stickyError = 0;
      logger.warn(
        { dropped: r.dropped },
        `${device}: the cache file syncs again; writes resume. ${r.dropped} blocks written whole since the last FLUSH were lost with the failed sync and read from the disk again`,
      );
    })().finally(() => {
      recovering = false;
    });
  };
  /**
   * The store failed on a sync of the cache file (its commit, an intent): engine.recoverSyncError
   * drops the fills staged since its last commit, whose pages may be gone, after the kernel stops
   * serving them (EVICT: the kernel marked them present when their MISS was answered; it keeps
   * blocks a write has made dirty or pending since, which its own sticky error sets aside), and
   * syncs the cache file again. One line when it recovers. False while the sync still fails.
   */
  let recovering = false;
  const recoverStore = async (): Promise<boolean> => {
    let dropped = 0;
    let ok: boolean;
    try {
      ok = await engine.recoverSyncError(async (extents) => {
        for (const e of extents) {
          for (let start = e.start; start < e.start + e.count; start += native.ULOOP_MAX_RANGE_BLOCKS) {
            const count = Math.min(native.ULOOP_MAX_RANGE_BLOCKS, e.start + e.count - start);
            const bits = new Bitmap(count, Buffer.alloc(Math.ceil(count / 8)));
            bits.setRange(0, count);
            native.uloopEvict(ctl, start, count, bits.buffer);
          }
          dropped += e.count;
        }
      });
    } catch (err) {
      if (!storeFatalLogged) logger.error(`${device}: the cache store cannot recover (${(err as Error).message}); restart the daemon`);
      storeFatalLogged = true;
      return false;
    }
    if (ok) logger.warn({ dropped }, `${device}: the cache store syncs again after a failed sync of ${store.paths.cache}; ${dropped} blocks filled since its last commit were dropped and are read from the disk again`);
    return ok;
  };
  let storeFatalLogged = false;
  const pollMs = options.pollMs ?? 200;
  const clearErrorMs = options.clearErrorMs ?? 2000;
  const poller = setInterval(poll, pollMs);
  poller.unref();
  poll();

  const kernelStatus = (): UloopStatus | null => {
    if (removed) return null;
    let q: native.UloopInfo;
    try {
      q = native.uloopQuery(ctl, index);
    } catch {
      return null;
    }
    return {
      attach,
      presentBlocks: q.presentBlocks,
      dirtyBlocks: q.dirtyBlocks,
      pendingBlocks: q.pendingBlocks,
      zeroBlocks: q.zeroBlocks,
      waiting: q.waiting,
      error: q.error ? errnoName(-q.error) : null,
      readHits: q.readHits,
      readMisses: q.readMisses,
      writeHits: q.writeHits,
      writeUpcalls: q.writeUpcalls,
      flushes: q.flushes,
      barriers: q.barriers,
      timeouts: q.timeouts,
      ioErrors: q.ioErrors,
      failedUpcalls,
      preserves: epochs.preserves(),
      lastRequestAt,
      ...(filler?.stats() ?? NO_UNIT_FILLS),
    };
  };

  const hydrateFill = async (offset: number, length: number) => {
    if (removed) throw new EngineClosedError(`${device} is detached`);
    const first = Math.floor(offset / blockSize);
    const end = Math.min(blockCount, Math.ceil((offset + length) / blockSize));
    for (let start = first; start < end; start += native.ULOOP_MAX_RANGE_BLOCKS) {
      const count = Math.min(native.ULOOP_MAX_RANGE_BLOCKS, end - start);
      const claimed = new Bitmap(count, Buffer.alloc(Math.ceil(count / 8)));
      const { id } = native.uloopClaim(ctl, start, count, claimed.buffer);
      if (id === 0) {
        // Nothing claimed: the kernel holds every block of the range (see below).
        await flushDevice();
        continue;
      }
      let filled = false;
      try {
        const runs = [...claimed.runs()].map((r) => ({ start: start + r.start, count: r.count }));
        for (const r of runs) {
          const bytes = engine.geometry.extentBytes(r.start, r.count);
          const buf = alignedBuffer(Math.ceil(bytes / 4096) * 4096).subarray(0, bytes);
          await engine.source.readAt(buf, engine.geometry.blockOffset(r.start));
          await store.writeData(buf, engine.geometry.blockOffset(r.start));
        }
        // Synced before either side calls them present (invariant 1).
        await store.syncData();
        native.uloopFilled(ctl, id, start, count, claimed.buffer);
        filled = true;
        store.markPresent(runs);
        // Blocks the kernel would not let go of are cached there already (written whole since the
        // last barrier, or being filled): a FLUSH hands their bits to the store, or the hydrator
        // would count them missing for ever.
        if (claimed.count() < count) await flushDevice();
      } finally {
        // A failed fill lets the claimed blocks go, still missing (FILLED with none set).
        if (!filled && !removed) {
          try {
            native.uloopFilled(ctl, id, start, count, Buffer.alloc(Math.ceil(count / 8)));
          } catch {
            // The claim ended with the daemon's fd or the device.
          }
        }
      }
    }
  };

  return {
    kind: 'uloop',
    device,
    kernelStatus,
    hydrateFill,
    async detach() {
      // A FLUSH first, so the bits of writes since the last one reach the store (a barrier this
      // process answers) before the kernel's copy of them goes away with the device.
      if (!options.readOnly) await flushDevice();
      // Fills around misses end first: their FILLED needs the device (one started after this
      // finds it gone and lets its data go uncounted: the next open punches it).
      await filler?.drain();
      native.uloopRemove(ctl, index); // refused (EBUSY) while the device is open
      removed = true;
      clearInterval(poller);
      watch.close();
      // Upcalls still running reply into a removed device (ENODEV, ignored); the fd is closed
      // only after the last of them, so no reply can reach a reused fd.
      await Promise.all([handler.drain(), filler?.close()]);
      closed = true;
      closeSync(ctl);
    },
  };
}

function errnoName(errno: number): string {
  return errnoInfo(errno)[0];
}
