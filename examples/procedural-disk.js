#!/usr/bin/env node
// A procedurally generated disk through the library API: every 4 KiB block of a 1 GiB device is
// made on demand by a function (a header naming the block, then a pattern derived from its number).
// Nothing backs it but the function and the cache, so only blocks that are read take space.
//
//   npm run build && node examples/procedural-disk.js [DEVICE]
//
// DEVICE defaults to the first free /dev/loopN when run as root, else to an NBD unix socket that
// qemu-io, nbdcopy or nbdfuse can open. The example reads a few blocks back through the device
// (loop only), prints the status, and detaches.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, promises as fsp, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createDevice } from 'ulobdev'; // the package's own name (package.json "exports"); see docs/library.md

const BLOCK = 4096;
const SIZE = 1 << 30;

/** Fills buf with the generated content of [offset, offset + buf.length). */
function generate(buf, offset) {
  for (let pos = 0; pos < buf.length; ) {
    const abs = offset + pos;
    const block = Math.floor(abs / BLOCK);
    const within = abs % BLOCK;
    const n = Math.min(BLOCK - within, buf.length - pos);
    blockContent(block).copy(buf, pos, within, within + n);
    pos += n;
  }
}

function blockContent(block) {
  const b = Buffer.alloc(BLOCK);
  b.write(`procedural block ${block}\n`);
  for (let i = 64; i < BLOCK; i++) b[i] = (block * 31 + i) & 0xff;
  return b;
}

const dir = mkdtempSync(join(tmpdir(), 'ulob-example-'));
const root = process.getuid?.() === 0;
const device = process.argv[2] ?? (root ? execFileSync('losetup', ['-f'], { encoding: 'utf8' }).trim() : `nbd+unix:///?socket=${join(dir, 'nbd.sock')}`);

let calls = 0;
const dev = await createDevice({
  device,
  cache: join(dir, 'gen.cache'),
  stateDir: join(dir, 'state'),
  runDir: join(dir, 'run'),
  source: {
    size: SIZE,
    // Change the id whenever the generator changes: the cache of another version is refused.
    id: 'procedural-disk-example:v1',
    description: 'procedural disk (examples/procedural-disk.js)',
    read(buf, offset) {
      calls++;
      generate(buf, offset);
    },
  },
});
console.log(`attached ${dev.device}`);

try {
  if (device.startsWith('/dev/loop')) {
    // Asynchronous reads only: this process serves the device, so a synchronous read would wait
    // on itself forever.
    const fh = await fsp.open(device, 'r');
    for (const block of [0, 1, 12345, SIZE / BLOCK - 1]) {
      const got = Buffer.alloc(BLOCK);
      await fh.read(got, 0, BLOCK, block * BLOCK);
      const ok = got.equals(blockContent(block));
      console.log(`block ${block}: ${JSON.stringify(got.subarray(0, got.indexOf(10)).toString())} ${ok ? 'ok' : 'MISMATCH'}`);
      if (!ok) process.exitCode = 1;
    }
    await fh.close();
  } else {
    console.log(`serving on ${device}; connect with: nbdinfo '${device}'  (press Ctrl-C to stop)`);
    await new Promise((resolve) => process.once('SIGINT', resolve));
  }
  const s = dev.status();
  console.log(`status: ${s.size} bytes, ${s.cachedBytes} cached (${s.cacheFillPercent}%), source read ${calls} times`);
} finally {
  await dev.detach();
  rmSync(dir, { recursive: true, force: true });
  console.log('detached');
}
