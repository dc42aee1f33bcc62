// The crash model itself (test/support/crashable.ts): a WAL sync the crashed process began must
// not settle, after the crash, the intents the next process holds back (it once spliced them off
// and applied them through its own closed connection, which threw: a live, synced intent lost,
// seen in the budget engine model as a FUA write lost or a present clean block over changed data).
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, expect, it } from 'vitest';
import { Metadata, type CacheIdentity } from '../../src/cache/metadata.js';
import { CrashWorld, Rng, SimulatedCrash } from '../support/crashable.js';

const identity: CacheIdentity = { uuid: '8d0d5a0e-6f7c-4a43-9d55-6b1b1c8f0c12', blockSize: 4096, backingSize: 16 * 4096, backingId: 'file:1:1:1' };
let dir: string;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'crash-world-'));
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

it("a crashed process's WAL sync resuming after the crash leaves the next process's intents alone", async () => {
  const world = new CrashWorld();
  const path = join(dir, 'meta.db');
  const old = world.metadata().create(path, identity, 'writeback');
  old.addDirtyUnsynced([{ start: 0, count: 3 }]);
  const stale = old.syncWal(); // still waiting for its thread when the process dies
  old.close();
  world.crash('process', new Rng(1));
  const m = world.metadata().open(path);
  try {
    m.addDirtyUnsynced([{ start: 14, count: 2 }]);
    await expect(stale).rejects.toBeInstanceOf(SimulatedCrash);
    await m.syncWal();
    const dirty = m.dirtyRows().map((r) => [r.start, r.count]);
    expect(dirty).toContainEqual([14, 2]);
    expect(dirty).toContainEqual([0, 3]);
  } finally {
    m.close();
  }
});
