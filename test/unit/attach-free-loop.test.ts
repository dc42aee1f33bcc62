// test/support/cli.ts attachFreeLoop: the free-loop-device retry the integration files share (an
// attach refused because another test took the device first is tried on the next free one).
import { expect, it } from 'vitest';
import { attachFreeLoop } from '../support/cli.js';
it('retries a taken device, then succeeds', async () => {
  const tried: string[] = [];
  const r = await attachFreeLoop(async (loop) => {
    tried.push(loop);
    return tried.length < 3 ? { code: 1, stdout: '', stderr: `ulobdev: ${loop}: Device or resource busy\n` } : { code: 0, stdout: `${loop}\n`, stderr: '' };
  });
  expect(tried.length).toBe(3);
  expect(r.loop).toBe(tried[2]);
  expect(r.result.stdout.trim()).toBe(r.loop);
});
it('throws at once on any other refusal', async () => {
  let n = 0;
  await expect(attachFreeLoop(async () => { n++; return { code: 1, stdout: '', stderr: 'ulobdev: bad flag\n' }; }, 'ulohttp failed')).rejects.toThrow(/^ulohttp failed \(\/dev\/loop\d+, exit 1\): ulobdev: bad flag/);
  expect(n).toBe(1);
});
it('gives up after 4 attempts', async () => {
  let n = 0;
  await expect(attachFreeLoop(async () => { n++; return { code: 1, stdout: '', stderr: 'is in use\n' }; })).rejects.toThrow(/attach failed .*is in use/);
  expect(n).toBe(4);
});
