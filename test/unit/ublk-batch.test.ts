// $ULOBDEV_UBLK_BATCH (the ublk queue threads' batched wait, K completions or US µs): what the
// server takes at create and what it refuses, and what status says before it serves. The wait
// itself needs ublk_drv and a 6.12+ kernel: bench/vm.js's ublkbatch rows run it in the VM.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { ublkBatch } from '../../src/bdev/ublk.js';
import { InvalidArgumentError } from '../../src/errors.js';
import { UblkServer } from '../../src/native/ublk.js';

const dir = mkdtempSync(join(tmpdir(), 'ublk-batch-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const saved = process.env.ULOBDEV_UBLK_BATCH;
afterEach(() => {
  if (saved === undefined) delete process.env.ULOBDEV_UBLK_BATCH;
  else process.env.ULOBDEV_UBLK_BATCH = saved;
});

/** A server (queue depth 8) made with $ULOBDEV_UBLK_BATCH set to `batch` (undefined: unset). */
function make(batch: string | undefined): UblkServer {
  if (batch === undefined) delete process.env.ULOBDEV_UBLK_BATCH;
  else process.env.ULOBDEV_UBLK_BATCH = batch;
  const cachePath = join(dir, 'c');
  writeFileSync(cachePath, '');
  const bits = new Uint8Array(8);
  return new UblkServer({ cachePath, size: 64 * 4096, blockSize: 4096, logical: 512, physical: 4096, queues: 1, depth: 8, bufBytes: 65536, readOnly: false }, bits, bits, () => undefined);
}

const BAD = ['', 'x', '4x', '33', '-1', '4,', '4,0', '4,10001', '4,50,1', '4;50', ' 4', '4,5 ', '4, 5', '+4'];

describe('$ULOBDEV_UBLK_BATCH, checked by the frontend (queue depth 32)', () => {
  it('takes K[,US]: off when unset, 0 or 1; US 50 µs unless given', () => {
    expect(ublkBatch({})).toEqual({ completions: 1, us: 50 });
    expect(ublkBatch({ ULOBDEV_UBLK_BATCH: '0' })).toEqual({ completions: 1, us: 50 });
    expect(ublkBatch({ ULOBDEV_UBLK_BATCH: '1' })).toEqual({ completions: 1, us: 50 });
    expect(ublkBatch({ ULOBDEV_UBLK_BATCH: '4' })).toEqual({ completions: 4, us: 50 });
    expect(ublkBatch({ ULOBDEV_UBLK_BATCH: '32,10000' })).toEqual({ completions: 32, us: 10000 });
    expect(ublkBatch({ ULOBDEV_UBLK_BATCH: '8,1' })).toEqual({ completions: 8, us: 1 });
  });

  it('refuses anything else with InvalidArgumentError naming the variable', () => {
    for (const v of BAD) {
      expect(() => ublkBatch({ ULOBDEV_UBLK_BATCH: v }), v).toThrow(InvalidArgumentError);
      expect(() => ublkBatch({ ULOBDEV_UBLK_BATCH: v }), v).toThrow(/ULOBDEV_UBLK_BATCH/);
    }
  });
});

describe('$ULOBDEV_UBLK_BATCH, read by the native server (queue depth 8)', () => {
  it('takes K (1 = off, up to the queue depth) and K,US (US from 1 to 10000 µs)', () => {
    for (const v of [undefined, '0', '1', '4', '8', '4,1', '4,50', '2,10000']) {
      const s = make(v);
      // not serving: no ring, so no batched wait in force (one completion, no bound)
      expect(s.query().batchWait).toBe(1);
      expect(s.query().batchWaitUs).toBe(0);
    }
  });

  it('refuses anything else at create, naming the variable', () => {
    for (const v of [...BAD.filter((b) => b !== '33'), '9']) {
      expect(() => make(v), v).toThrow(/ULOBDEV_UBLK_BATCH/);
    }
  });
});
