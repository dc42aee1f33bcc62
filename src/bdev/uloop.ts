// /dev/uloopN: the kernel module (kernel/uloop.c) serves hits from the cache file itself; this
// frontend is its daemon. It answers misses by filling through the engine, dirty intents with
// store.markDirty (rule 3), and barriers by recording the bits the kernel reports after it synced
// the cache file (rules 4-6).
import { spawnSync } from 'node:child_process';
import { closeSync, existsSync, openSync, readFileSync } from 'node:fs';
import { release } from 'node:os';
import { open } from 'node:fs/promises';
import type { Logger } from 'pino';
import { Bitmap } from '../cache/bitmap.js';
import type { CacheEngine } from '../cache/engine.js';
import { EngineClosedError, InternalError } from '../errors.js';
import type { Extent } from '../cache/layout.js';
import * as native from '../native/uloop.js';
import type { Frontend } from './frontend.js';
import { moduleMissing, moduleRejected, uloopError } from './uloop-errors.js';

/**
 * Makes sure /dev/uloop-control exists: when it does not, loads the installed module (DKMS puts it
 * in /lib/modules/$(uname -r)/updates/dkms) with `modprobe uloop`, as a sysadmin would.
 * Throws ModuleRejectedError when the kernel refuses the module's signature (Secure Boot), and
 * ModuleMissingError when no module is installed for the running kernel or modprobe fails otherwise;
 * each message is one line pointing to docs/laptop.md.
 */
export function assertUloopModule(device: string): void {
  if (existsSync(native.ULOOP_CONTROL)) return;
  const path = `${process.env.PATH ?? '/usr/bin:/bin'}:/usr/local/sbin:/usr/sbin:/sbin`;
  const r = spawnSync('modprobe', ['uloop'], { encoding: 'utf8', env: { ...process.env, PATH: path }, timeout: 60_000 });
  if (r.status === 0 && existsSync(native.ULOOP_CONTROL)) return;
  const said = `${r.stderr ?? ''}`.trim().split('\n').pop() ?? '';
  const rejected = moduleRejected(device, said, lockedDown());
  if (rejected) throw rejected;
  if (r.error || /not found/i.test(said) || r.status === 0) throw moduleMissing(device, `not installed for kernel ${release()}`);
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
}

const EIO = -5;

export async function attachUloop(options: UloopOptions): Promise<Frontend> {
  const { engine, logger } = options;
  const store = engine.store;
  const { blockSize, blockCount } = engine.geometry;
  const want = Number(options.device.slice('/dev/uloop'.length));
  const request = { device: options.device, size: engine.size, blockSize, cache: store.paths.cache };
  // This module takes every dirty block as present (ABI 1, no ULOOP_F_ZERO): zeroed blocks, which
  // the cache file does not hold, get their zeros written first.
  if (store.zeroBlocks() > 0) await engine.materializeZeroed();

  let ctl: number;
  try {
    ctl = native.uloopOpen();
  } catch (err) {
    throw uloopError('open', err, request);
  }
  let cache = -1;
  let index: number;
  try {
    cache = openSync(store.paths.cache, options.readOnly ? 'r' : 'r+');
    const flags = options.readOnly ? 0 : native.ULOOP_F_WRITEBACK;
    try {
      index = native.uloopAdd(ctl, cache, engine.size, blockSize, flags, store.present.buffer, store.dirty.buffer, want);
    } catch (err) {
      throw uloopError('ADD', err, request);
    }
  } catch (err) {
    if (cache >= 0) closeSync(cache);
    closeSync(ctl);
    throw err;
  }

  const blocks = (offset: number, length: number): Extent[] => [
    { start: Math.floor(offset / blockSize), count: Math.ceil((offset + length) / blockSize) - Math.floor(offset / blockSize) },
  ];

  const handle = async (m: native.UloopMessage): Promise<void> => {
    switch (m.type) {
      case native.ULOOP_MSG_MISS:
        await engine.read(m.offset, m.length); // fills the cache file; the commit records it present
        return;
      case native.ULOOP_MSG_INTENT: {
        const range = blocks(m.offset, m.length);
        const { start, count } = range[0]!;
        // The kernel counts a block present once its MISS is answered, but the engine answers
        // before the fill is synced (rule 1): commit it first, or the dirty bit would be durable
        // over fill data that a power loss can still take away (invariant 1).
        if (!store.present.allSet(start, start + count)) await engine.flush();
        store.markDirty(range);
        return;
      }
      case native.ULOOP_MSG_BARRIER: {
        const present = new Bitmap(blockCount, Buffer.alloc(m.length));
        const dirty = new Bitmap(blockCount, Buffer.alloc(m.length));
        native.uloopBarrierBits(ctl, m.id, present.buffer, dirty.buffer);
        // The kernel synced the cache file before sending the barrier: these bits may be recorded.
        store.markDirty([...dirty.runs()]);
        for (const e of dirty.runs()) present.clearRange(e.start, e.start + e.count);
        store.markPresent([...present.runs()]);
        return;
      }
      default:
        throw new InternalError(`unknown uloop message type ${m.type}`);
    }
  };

  const watch = new native.UloopWatch(ctl, (err, msgs) => {
    if (err) {
      logger.error({ err }, 'uloop request channel failed');
      return;
    }
    for (const m of msgs) {
      handle(m).then(
        () => native.uloopReply(ctl, m.id, 0),
        (e: unknown) => {
          logger.warn({ err: e, type: m.type, offset: m.offset, length: m.length }, 'uloop request failed');
          native.uloopReply(ctl, m.id, EIO);
        },
      );
    }
  });

  const device = `/dev/uloop${index}`;
  // Flush epochs (rule 7) on both sides. The kernel writes hits itself and keeps its own dirty bits:
  // the flushed set is the store's snapshot narrowed to blocks dirty in the kernel too (a block
  // whose barrier the store has not recorded yet waits for the next epoch). At commit the kernel
  // clears first, the store (clearFlushed) right after in the same tick: a write to a cleared block
  // then waits for an INTENT that is answered only once the store has cleared it too.
  // Once the device is removed the store holds all its bits (detach sends a FLUSH first), but an
  // epoch begun in the kernel cannot be committed without it: its rewritten blocks are unknown.
  let kernelEpoch = 0; // of the open flush epoch; 0: none
  let removed = false;
  if (!options.readOnly) {
    engine.externalEpochs = {
      begin(flushing) {
        kernelEpoch = 0;
        if (removed) return;
        const kernel = Buffer.alloc(flushing.buffer.byteLength);
        kernelEpoch = native.uloopEpochBegin(ctl, kernel);
        for (let i = 0; i < kernel.byteLength; i++) flushing.buffer[i]! &= kernel[i]!;
        flushing.changed();
      },
      commit(cleaned) {
        const epoch = kernelEpoch;
        kernelEpoch = 0;
        if (epoch === 0) return;
        if (removed) throw new EngineClosedError(`${device} was removed during the flush; its blocks stay dirty for the next one`);
        native.uloopEpochCommit(ctl, epoch, cleaned.buffer);
      },
    };
  }

  logger.info('uloop device added');
  return {
    kind: 'uloop',
    device,
    async detach() {
      // A FLUSH first, so the bits of writes since the last one reach the store (a barrier this
      // process answers) before the kernel's copy of them goes away with the device.
      if (!options.readOnly) {
        const fh = await open(device, 'r');
        try {
          await fh.sync();
        } finally {
          await fh.close();
        }
      }
      native.uloopRemove(ctl, index); // refused (EBUSY) while the device is open
      removed = true;
      watch.close();
      closeSync(ctl);
      closeSync(cache);
    },
  };
}
