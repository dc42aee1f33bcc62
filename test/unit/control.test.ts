// The control socket's client and server: answers, errors, and a daemon that dies mid-request.
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ControlServer, controlRequest } from '../../src/daemon/control.js';
import { NotAttachedError } from '../../src/errors.js';

let dir: string;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'ulob-control-'));
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

describe('control socket', () => {
  it('answers requests, passes coded errors through, and is private (0600)', async () => {
    const path = join(dir, 'd.sock');
    const server = await ControlServer.listen(path, async (req) => {
      if (req.cmd === 'status') return { status: { ok: 1 } };
      throw Object.assign(new Error('no such thing'), { code: 'ULOB_E_TEST' });
    });
    try {
      expect(statSync(path).mode & 0o777).toBe(0o600);
      expect(await controlRequest(path, { cmd: 'status' })).toEqual({ status: { ok: 1 } });
      await expect(controlRequest(path, { cmd: 'other' })).rejects.toMatchObject({ code: 'ULOB_E_TEST', message: 'no such thing' });
    } finally {
      await server.close();
    }
  });

  it('says at once when nobody listens', async () => {
    await expect(controlRequest(join(dir, 'none.sock'), { cmd: 'status' })).rejects.toBeInstanceOf(NotAttachedError);
  });

  it('fails at once, not at the timeout, when the daemon closes the connection without answering', async () => {
    const path = join(dir, 'dying.sock');
    const server = net.createServer((socket) => socket.once('data', () => socket.destroy()));
    await new Promise<void>((resolve) => server.listen(path, resolve));
    try {
      const started = Date.now();
      await expect(controlRequest(path, { cmd: 'flush', wait: true }, 3_600_000)).rejects.toMatchObject({ code: 'ULOB_E_DAEMON' });
      expect(Date.now() - started).toBeLessThan(2000);
    } finally {
      server.close();
    }
  });
});
