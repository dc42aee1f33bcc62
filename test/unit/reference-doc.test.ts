// docs/reference.md names every field `status --json` shows: a serve-only daemon in write-back
// mode with hydration (every optional part present) is asked for its status, and each key must be
// in the Status section.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import pino from 'pino';
import { afterAll, describe, expect, it } from 'vitest';
import { Daemon } from '../../src/daemon/daemon.js';
import { openBacking } from '../../src/source/backing.js';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
const dir = mkdtempSync(join(tmpdir(), 'ulob-reference-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Every key of a status object; nested objects as their own keys too (writeback.progress's, etc.). */
function keysOf(value: unknown, out = new Set<string>()): Set<string> {
  if (value && typeof value === 'object' && !Array.isArray(value)) {
    for (const [k, v] of Object.entries(value)) {
      out.add(k);
      keysOf(v, out);
    }
  }
  return out;
}

describe('docs/reference.md', () => {
  it('has a Status entry for every field of status --json', async () => {
    const disk = join(dir, 'disk.img');
    writeFileSync(disk, Buffer.alloc(1 << 20, 7));
    const daemon = await Daemon.start({
      device: `nbd+unix:///?socket=${join(dir, 'nbd.sock')}`,
      openSource: ({ writable }) => openBacking(disk, { writable }),
      cache: join(dir, 'c.cache'),
      writeback: true,
      writebackPolicy: { hydrateRate: 0, flushCron: '0 0 1 1 *' },
      stateDir: join(dir, 'state'),
      runDir: join(dir, 'run'),
      logger: pino({ enabled: false }),
    });
    let status;
    try {
      status = daemon.status();
    } finally {
      await daemon.detach();
    }
    expect(status.writeback).toBeDefined();
    expect(status.hydration).toBeDefined();
    const doc = readFileSync(join(ROOT, 'docs/reference.md'), 'utf8');
    const section = doc.slice(doc.indexOf('## Status'), doc.indexOf('## Messages'));
    const missing = [...keysOf(status)].filter((k) => !section.includes(`\`${k}\``));
    expect(missing).toEqual([]);
  });
});
