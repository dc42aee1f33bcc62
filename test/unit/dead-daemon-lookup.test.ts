// newuser8 item 5: a daemon that died is found by its device's short name (loop3), as a live one
// is (resolveDaemon), not only by its own name or full device path.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { findRecord } from '../../src/daemon/leftovers.js';

let runDir: string;

beforeEach(() => {
  runDir = mkdtempSync(join(tmpdir(), 'ulob-dead-lookup-'));
  // The record plain /dev/loop leaves: named "loop", serving /dev/loop3 (pid and start time of no live process).
  writeFileSync(join(runDir, 'loop.json'), JSON.stringify({ pid: 2_000_000_000, startTime: 1, name: 'loop', device: '/dev/loop3', frontend: 'loop', startedAt: 0 }));
});

afterEach(() => rmSync(runDir, { recursive: true, force: true }));

describe('findRecord', () => {
  it('finds a daemon by its name, its device, and its device\'s short name; nothing for another device', async () => {
    expect(await findRecord(runDir, 'loop', 'loop')).toMatchObject({ name: 'loop', device: '/dev/loop3' });
    expect(await findRecord(runDir, '/dev/loop3', 'loop3')).toMatchObject({ name: 'loop', device: '/dev/loop3' });
    // What 'status loop3' asks (recoverIfDead: the short name as both).
    expect(await findRecord(runDir, 'loop3', 'loop3')).toMatchObject({ name: 'loop', device: '/dev/loop3' });
    expect(await findRecord(runDir, 'loop2', 'loop2')).toBeNull();
    expect(await findRecord(runDir, 'loop33', 'loop33')).toBeNull();
  });
});
