// Which TCP addresses the NBD server listens on (issue 14, item 8): NBD here has no
// authentication and no encryption, so an address other machines reach needs allowRemote, in the
// library as on the command line.
import { describe, expect, it } from 'vitest';
import { NbdServer, assertLocalAddress, isLoopbackHost } from '../../src/bdev/nbd-server/index.js';

const backend = {
  size: 1 << 20,
  read: async (_o: number, l: number) => Buffer.alloc(l),
  write: async () => undefined,
  flush: async () => undefined,
  discard: async () => undefined,
};

describe('NBD listen addresses', () => {
  it('knows loopback from the rest', () => {
    for (const h of ['127.0.0.1', '127.1.2.3', '::1', '[::1]', 'localhost', 'LOCALHOST', '::ffff:127.0.0.1', '0:0:0:0:0:0:0:1']) expect(isLoopbackHost(h), h).toBe(true);
    for (const h of ['0.0.0.0', '::', '[::]', '192.168.1.10', '10.0.0.1', 'fe80::1', 'nas.local', 'example.org', '128.0.0.1']) expect(isLoopbackHost(h), h).toBe(false);
  });

  it('refuses a remote address with what it would expose, allows it when asked, never checks unix sockets', () => {
    expect(() => assertLocalAddress({ host: '0.0.0.0', port: 10809 }, { what: 'the cached disk', writable: true })).toThrow(
      /^nbd:\/\/0\.0\.0\.0:10809 would let anyone who can reach port 10809 of this machine read and write the cached disk, with no password and no encryption; listen on 127\.0\.0\.1 or a unix socket, or pass --allow-remote/,
    );
    expect(() => assertLocalAddress({ host: '0.0.0.0', port: 10809 }, { allowRemote: true })).not.toThrow();
    expect(() => assertLocalAddress({ port: 10809 })).not.toThrow();
    expect(() => assertLocalAddress({ path: '/run/x.sock' })).not.toThrow();
  });

  it('NbdServer.listen refuses 0.0.0.0 unless made with allowRemote', async () => {
    const refused = new NbdServer({ backend });
    await expect(refused.listen({ host: '0.0.0.0', port: 0 })).rejects.toMatchObject({ code: 'ULOB_E_INVALID_ARG' });
    const local = new NbdServer({ backend });
    await local.listen({ port: 0 });
    expect(local.url).toMatch(/^nbd:\/\/127\.0\.0\.1:\d+$/);
    await local.close();
    const remote = new NbdServer({ backend, allowRemote: true });
    await remote.listen({ host: '0.0.0.0', port: 0 });
    expect(remote.url).toMatch(/^nbd:\/\/0\.0\.0\.0:\d+$/);
    await remote.close();
  });
});
