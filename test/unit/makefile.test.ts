// The Makefile's set-up steps on a clean clone, with npm, npx and the man page script replaced by
// stand-ins that log what they were asked and make their outputs: `npm ci` builds the addon
// already (npm runs `node-gyp rebuild` for a package with a binding.gyp and no install script of
// its own), so `make build` (and with it make demo and make test) must not build it a second time
// (newuser4 item 8: the addon compiled twice). A change to the native sources still rebuilds it.
import { execFileSync } from 'node:child_process';
import { chmodSync, copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';

const root = join(import.meta.dirname, '../..');
const dir = mkdtempSync(join(tmpdir(), 'makefile-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const log = join(dir, 'calls.log');
const addonBuilds = () => readFileSync(log, 'utf8').split('\n').filter((l) => /node-gyp/.test(l));

function stub(name: string, body: string): void {
  writeFileSync(join(dir, 'bin', name), `#!/bin/bash\n${body}\n`);
  chmodSync(join(dir, 'bin', name), 0o755);
}

function make(...goals: string[]): void {
  execFileSync('make', ['-s', '-C', join(dir, 'tree'), ...goals], { env: { ...process.env, PATH: `${join(dir, 'bin')}:${process.env.PATH}` }, stdio: 'pipe' });
}

describe('make build on a clean clone', () => {
  it('builds the native addon once: npm ci built it, make does not build it again', () => {
    const tree = join(dir, 'tree');
    for (const d of ['bin', 'tree/native', 'tree/src', 'tree/scripts']) mkdirSync(join(dir, d), { recursive: true });
    copyFileSync(join(root, 'Makefile'), join(tree, 'Makefile'));
    writeFileSync(join(tree, 'package.json'), '{"name":"ulobdev","version":"0.0.0"}\n');
    writeFileSync(join(tree, 'package-lock.json'), '{}\n');
    writeFileSync(join(tree, 'binding.gyp'), '{}\n');
    writeFileSync(join(tree, 'native/addon.cc'), '\n');
    writeFileSync(join(tree, 'src/a.ts'), '\n');
    writeFileSync(join(tree, 'tsconfig.json'), '{}\n');
    writeFileSync(join(tree, 'scripts/man.mjs'), `import { mkdirSync, writeFileSync } from 'node:fs';
mkdirSync(process.argv[2], { recursive: true });
for (const c of ['ulobdev', 'ulohttp']) writeFileSync(process.argv[2] + '/' + c + '.8', '');
`);
    // npm ci: node_modules, and npm's implicit install script for a binding.gyp: node-gyp rebuild.
    stub('npm', `echo "npm $*" >>${log}
[ "$1" = ci ] || exit 1
mkdir -p node_modules build/Release && echo "node-gyp rebuild (npm's install)" >>${log} && touch build/Release/ulob_native.node`);
    stub('npx', `echo "npx $*" >>${log}
case "$1" in
  node-gyp) mkdir -p build/Release && touch build/Release/ulob_native.node ;;
  tsc) mkdir -p dist/cli ;;
  rolldown) while [ $# -gt 0 ]; do [ "$1" = --file ] && touch "$2"; shift; done ;;
esac`);
    writeFileSync(log, '');
    make('build');
    expect(addonBuilds(), readFileSync(log, 'utf8')).toEqual(["node-gyp rebuild (npm's install)"]);

    // Up to date: nothing builds it.
    writeFileSync(log, '');
    make('build');
    expect(addonBuilds()).toEqual([]);

    // A native source changed: make builds it (once).
    const later = new Date(Date.now() + 60_000);
    utimesSync(join(tree, 'native/addon.cc'), later, later);
    make('build');
    expect(addonBuilds()).toEqual(['npx node-gyp rebuild']);
  });
});
