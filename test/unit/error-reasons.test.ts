// Decisions about our own errors read their typed fields (code, reason, path, use), never their
// message text (nits14 finding 4): a reworded message must not change what the code does.
import { describe, expect, it } from 'vitest';
import { explainNoSpace } from '../../src/daemon/daemon.js';
import { IOFailedError, MetadataFullError } from '../../src/errors.js';

const paths = { cache: '/flash/c.cache', bitmap: '/flash/c.bitmap', metadata: '/flash/c.cache.meta' };
const enospc = Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC' });

describe('explainNoSpace names the file by the error\'s path', () => {
  it('the bitmap, from an IOFailedError whose message does not name it', () => {
    const err = new IOFailedError('cannot write the bitmap: ENOSPC', { cause: enospc, path: '/flash/c.bitmap' });
    expect((explainNoSpace(err, paths) as Error).message).toMatch(/^no space left for \/flash\/c\.bitmap: /);
  });

  it('the metadata, from a MetadataFullError (SQLite names no file)', () => {
    const err = new MetadataFullError('database or disk is full', { cause: Object.assign(new Error('database or disk is full'), { code: 'SQLITE_FULL' }), path: '/flash/c.cache.meta' });
    expect((explainNoSpace(err, paths) as Error).message).toMatch(/^no space left for \/flash\/c\.cache\.meta: /);
  });

  it('a path only in the message is no evidence: the cache file, as for any ENOSPC without one', () => {
    const err = new IOFailedError('cannot write the bitmap /flash/c.bitmap: ENOSPC', { cause: enospc });
    expect((explainNoSpace(err, paths) as Error).message).toMatch(/^no space left for \/flash\/c\.cache: /);
  });

  it("the metadata's companions (its WAL, -shm, the flash reserve) count as the metadata: they are on its filesystem (review14)", () => {
    const meta = { ...paths, metadata: '/ssd/c.cache.meta' };
    for (const p of ['/ssd/c.cache.meta-wal', '/ssd/c.cache.meta-shm', '/ssd/c.cache.meta-reserve']) {
      const err = new IOFailedError(`cannot extend ${p}: ENOSPC`, { cause: enospc, path: p });
      expect((explainNoSpace(err, meta) as Error).message, p).toMatch(/^no space left for \/ssd\/c\.cache\.meta: /);
    }
  });
});
