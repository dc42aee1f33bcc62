// ulohttp end to end: nginx (started here, on 127.0.0.1) serves an ext4 and a squashfs image;
// ulohttp exposes each through /dev/loopN; every file's checksum equals the source's; a second run
// fetches nothing already cached; a fault proxy in between still yields correct data; an image
// replaced on the server is detected; a server without ranges is refused with one line.
import { createHash, randomBytes } from 'node:crypto';
import { copyFileSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { freeLoop, mustSh, prepareCliTests, scratch, sh, ulobdev } from '../support/cli.js';
import { startFaultProxy, startNginx, startRangeServer, ulohttp, type Nginx } from '../support/http-env.js';

let s: ReturnType<typeof scratch>;
let nginx: Nginx;
const sums = new Map<string, string>();
const attached: string[] = [];
const mounts: string[] = [];
const stops: Array<() => Promise<unknown>> = [];

function sha(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

function walk(dir: string, base = dir, out: string[] = []): string[] {
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) walk(p, base, out);
    else if (e.isFile()) out.push(relative(base, p));
  }
  return out;
}

beforeAll(async () => {
  prepareCliTests();
  s = scratch('ulohttp-');
  const tree = join(s.dir, 'tree');
  // A tree with many small files, a few large ones, and nested directories.
  for (let d = 0; d < 8; d++) {
    mkdirSync(join(tree, `d${d}`, 'sub'), { recursive: true });
    for (let f = 0; f < 40; f++) writeFileSync(join(tree, `d${d}`, f % 3 ? `f${f}` : `sub/f${f}`), randomBytes(100 + ((f * 7919 + d * 131) % 20000)));
  }
  writeFileSync(join(tree, 'big1'), randomBytes(9 * 1024 * 1024 + 4321));
  writeFileSync(join(tree, 'big2'), randomBytes(3 * 1024 * 1024));
  for (const f of walk(tree)) sums.set(f, sha(readFileSync(join(tree, f))));
  const www = join(s.dir, 'www');
  mkdirSync(www);
  mustSh('mkfs.ext4', ['-q', '-F', '-d', tree, join(www, 'disk.ext4'), '64M']);
  mustSh('mksquashfs', [tree, join(www, 'disk.sqfs'), '-quiet', '-noappend', '-no-progress']);
  nginx = await startNginx(join(s.dir, 'nginx'), www);
});

afterEach(async () => {
  for (const m of mounts.splice(0)) sh('umount', [m]);
  for (const dev of attached.splice(0)) await ulobdev(['detach', dev, '--run-dir', s.runDir]);
  for (const stop of stops.splice(0)) await stop();
});

afterAll(async () => {
  await nginx?.stop();
  if (!process.env.ULOB_KEEP) s?.cleanup();
});

async function attach(url: string, cache: string, extra: string[] = []): Promise<string> {
  for (let attempt = 0; ; attempt++) {
    const loop = freeLoop();
    const r = await ulohttp(['-c', cache, '--daemon', '--run-dir', s.runDir, ...extra, loop, url]);
    if (r.code === 0) {
      expect(r.stdout.trim()).toBe(loop);
      attached.push(loop);
      return loop;
    }
    if (!/in use|busy/.test(r.stderr) || attempt === 3) throw new Error(`ulohttp failed (${r.code}): ${r.stderr}`);
  }
}

async function detach(loop: string): Promise<void> {
  const r = await ulohttp(['detach', loop, '--run-dir', s.runDir]);
  expect(r.stderr).toBe('');
  expect(r.code).toBe(0);
  attached.splice(attached.indexOf(loop), 1);
}

function mount(dev: string, name: string, type: string): string {
  const dir = join(s.dir, name);
  mkdirSync(dir, { recursive: true });
  mustSh('mount', ['-t', type, '-o', 'ro', dev, dir]);
  mounts.push(dir);
  return dir;
}

function umount(dir: string): void {
  mustSh('umount', [dir]);
  mounts.splice(mounts.indexOf(dir), 1);
}

function checkTree(dir: string): void {
  const found = walk(dir).filter((f) => f !== 'lost+found');
  expect(found.sort()).toEqual([...sums.keys()].sort());
  for (const [f, sum] of sums) expect(sha(readFileSync(join(dir, f))), f).toBe(sum);
}

async function status(loop: string): Promise<Record<string, any>> {
  const r = await ulohttp(['status', loop, '--json', '--run-dir', s.runDir]);
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout);
}

describe('dbg', () => {
  it('detects an image replaced on the server: reads fail with EIO, reattach is refused, --revalidate starts over', async () => {
    const image = join(nginx.root, 'changing.ext4');
    console.log('STEP 1', Date.now() % 100000);
    copyFileSync(join(nginx.root, 'disk.ext4'), image);
    console.log('STEP 2', Date.now() % 100000);
    const url = `http://127.0.0.1:${nginx.port}/changing.ext4`;
    console.log('STEP 3', Date.now() % 100000);
    const cache = join(s.dir, 'changing.cache');
    console.log('STEP 4', Date.now() % 100000);
    const loop = await attach(url, cache);
    console.log('STEP 5', Date.now() % 100000);
    const first = sh('dd', [`if=${loop}`, 'of=/dev/null', 'bs=4096', 'count=16', 'iflag=direct']);
    console.log('STEP 6', Date.now() % 100000);
    expect(first.status, first.stderr).toBe(0);
    console.log('STEP 7', Date.now() % 100000);
    // A new version: same size, new content and mtime (so a new ETag).
    const next = randomBytes(statSync(image).size);
    console.log('STEP 8', Date.now() % 100000);
    writeFileSync(join(nginx.root, 'tmp.img'), next);
    console.log('STEP 9', Date.now() % 100000);
    mustSh('touch', ['-d', '2030-01-01', join(nginx.root, 'tmp.img')]);
    console.log('STEP 10', Date.now() % 100000);
    mustSh('mv', [join(nginx.root, 'tmp.img'), image]);
    console.log('STEP 11', Date.now() % 100000);
    const later = sh('dd', [`if=${loop}`, 'of=/dev/null', 'bs=4096', 'count=16', 'skip=4096', 'iflag=direct']);
    console.log('STEP 12', Date.now() % 100000);
    expect(later.status).not.toBe(0);
    console.log('STEP 13', Date.now() % 100000);
    expect(later.stderr).toMatch(/Input\/output error/);
    console.log('STEP 14', Date.now() % 100000);
    expect((await status(loop)).source.imageChanged).toBe(true);
    console.log('STEP 15', Date.now() % 100000);
    // Blocks cached before the change still read (they are the old version, consistently).
    expect(sh('dd', [`if=${loop}`, 'of=/dev/null', 'bs=4096', 'count=16', 'iflag=direct']).status).toBe(0);
    console.log('STEP 16', Date.now() % 100000);
    await detach(loop);
    console.log('STEP 17', Date.now() % 100000);

    const refused = await ulohttp(['-c', cache, '--daemon', '--run-dir', s.runDir, `nbd+unix:///?socket=${join(s.dir, 'changed.sock')}`, url]);
    console.log('STEP 18', Date.now() % 100000);
    expect(refused.code).toBe(1);
    console.log('STEP 19', Date.now() % 100000);
    expect(refused.stderr).toMatch(/^ulohttp: the image at .* changed on the server\); pass --revalidate to discard the cache and start over\n$/);
    console.log('STEP 20', Date.now() % 100000);
    const fresh = await attach(url, cache, ['--revalidate']);
    console.log('STEP 21', Date.now() % 100000);
    const r = sh('dd', [`if=${fresh}`, 'bs=4096', 'count=4', 'skip=100', 'iflag=direct', 'status=none'], );
    console.log('STEP 22', Date.now() % 100000);
    expect(r.status).toBe(0);
    console.log('STEP 23', Date.now() % 100000);
    expect(sha(Buffer.from(r.stdout, 'latin1'))).toBeDefined();
    console.log('STEP 24', Date.now() % 100000);
    const bytes = readFileSync(`/dev/${fresh.slice(5)}`).subarray(4096 * 100, 4096 * 104);
    console.log('STEP 25', Date.now() % 100000);
    expect(bytes.equals(next.subarray(4096 * 100, 4096 * 104))).toBe(true);
    console.log('STEP 26', Date.now() % 100000);
    await detach(fresh);
    console.log('STEP 27', Date.now() % 100000);
  });

});
