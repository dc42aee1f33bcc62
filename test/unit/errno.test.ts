// System errors libuv has no name for (ESTALE, EUCLEAN, ENOMEDIUM, ...; src/errno.ts): the code is
// the errno's name and the line the CLI prints says what happened, not "Unknown system error -116";
// they count as I/O errors (exit 74), not as a bug (exit 70).
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { constants, tmpdir } from 'node:os';
import { join } from 'node:path';
import { getSystemErrorMap } from 'node:util';
import { afterAll, describe, expect, it } from 'vitest';
import { errnoError } from '../../src/native/addon.js';
import { UblkServer } from '../../src/native/ublk.js';
import { oneLine } from '../../src/cli/background.js';
import { exitCodeFor } from '../../src/cli/exit-codes.js';
import { ioError } from '../../src/errors.js';
import { DiskHealth } from '../../src/source/health.js';
import { errnoInfo, systemErrorCode } from '../../src/errno.js';

const dir = mkdtempSync(join(tmpdir(), 'errno-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A real ESTALE made by the addon's C++ (ThrowErrno): a ublk epoch committed twice. */
function nativeEstale(): unknown {
  const cachePath = join(dir, 'c');
  writeFileSync(cachePath, '');
  const bits = new Uint8Array(8);
  const s = new UblkServer({ cachePath, size: 64 * 4096, blockSize: 4096, logical: 512, physical: 4096, queues: 1, depth: 4, bufBytes: 65536, readOnly: false }, bits, bits, () => undefined);
  const ep = s.epochBegin(new Uint8Array(8));
  s.epochCommit(ep, new Uint8Array(8));
  try {
    s.epochCommit(ep, new Uint8Array(8));
  } catch (err) {
    return err;
  }
  throw new Error('the second commit of an epoch did not throw');
}

/** What node's fs throws for an errno libuv cannot map (lib/internal/errors.js, uvException). */
function nodeFsEstale(): Error {
  return Object.assign(new Error("UNKNOWN: unknown error, read '/mnt/nfs/disk.img'"), { code: 'UNKNOWN', errno: -116, syscall: 'read', path: '/mnt/nfs/disk.img' });
}

describe('errno values libuv does not name', () => {
  it('the addon names ESTALE: code, message, the CLI line and exit code 74 (I/O)', () => {
    const err = nativeEstale() as { code: string; errno: number; message: string };
    expect(err).toMatchObject({ code: 'ESTALE', errno: 116, message: 'ESTALE: stale file handle, ublk epoch commit' });
    expect(oneLine(err)).toBe('ESTALE: stale file handle, ublk epoch commit');
    expect(exitCodeFor(err)).toBe(74);
    const e2 = errnoError(116, 'pwrite');
    expect([e2.code, e2.message]).toEqual(['ESTALE', 'ESTALE: stale file handle, pwrite']);
  });

  it("node's fs form (code UNKNOWN, errno -116): the CLI line, the exit code, an I/O error's detail and the disk's state", () => {
    const err = nodeFsEstale();
    expect(oneLine(err)).toBe("ESTALE: stale file handle, read '/mnt/nfs/disk.img'");
    expect(exitCodeFor(err)).toBe(74);
    expect(ioError('read', '/mnt/nfs/disk.img', err).message).toBe('cannot read /mnt/nfs/disk.img: ESTALE (read)');
    const health = new DiskHealth();
    health.failed(err);
    expect(health.status()).toMatchObject({ state: 'gone', lastError: "ESTALE: stale file handle, read '/mnt/nfs/disk.img'" });
  });

  it("a lone 'Unknown system error -N' (node's child_process) is named too", () => {
    const err = Object.assign(new Error('spawn Unknown system error -8'), { code: 'Unknown system error -8', errno: -8, syscall: 'spawn' });
    expect(oneLine(err)).toBe('spawn ENOEXEC: exec format error');
    expect(systemErrorCode(err)).toBe('ENOEXEC');
  });

  it('every Linux errno value (1-133) has a name and a description; node\'s own names are kept', () => {
    // Two names of one value: libuv's is the one given.
    const aliases: Record<string, string> = { EWOULDBLOCK: 'EAGAIN', EDEADLOCK: 'EDEADLK', EOPNOTSUPP: 'ENOTSUP' };
    for (const [name, n] of Object.entries(constants.errno)) expect([name, aliases[name]], name).toContain(errnoInfo(n)[0]);
    const unnamed: number[] = [];
    for (let n = 1; n <= 133; n++) {
      if (n === 41 || n === 58) continue; // no errno has these numbers
      const [name, description] = errnoInfo(n);
      expect(name, String(n)).toMatch(/^E[A-Z0-9]+$/);
      expect(description, name).not.toMatch(/unknown/i);
      if (!getSystemErrorMap().has(-n)) unnamed.push(n);
      expect(errnoError(n, 'x').message, name).toBe(`${name}: ${description}, x`);
    }
    // What this covers: the values node leaves unnamed (ESTALE, EUCLEAN, ENOMEDIUM among them).
    expect(unnamed).toEqual(expect.arrayContaining([116, 117, 122, 123]));
  });
});
