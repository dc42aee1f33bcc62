#!/usr/bin/env node
// Writes ulobdev.8 and ulohttp.8 into DIR from the built CLI (dist/): `make man` runs it.
//   node scripts/man.mjs DIR [YYYY-MM-DD]
// The date defaults to the last commit's (SOURCE_DATE_EPOCH when set), so a rebuild is identical.
import { execFileSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

const root = new URL('..', import.meta.url).pathname;
const dir = process.argv[2];
if (!dir) {
  console.error('usage: node scripts/man.mjs DIR [YYYY-MM-DD]');
  process.exit(1);
}
let date = process.argv[3];
if (!date && process.env.SOURCE_DATE_EPOCH) date = new Date(Number(process.env.SOURCE_DATE_EPOCH) * 1000).toISOString().slice(0, 10);
if (!date) {
  try {
    date = execFileSync('git', ['-C', root, 'log', '-1', '--format=%cs'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
  } catch {
    date = '';
  }
}
date ||= new Date().toISOString().slice(0, 10);
const { version } = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'));
const { ulobdevManPage, ulohttpManPage } = await import(join(root, 'dist/cli/man-pages.js'));
mkdirSync(dir, { recursive: true });
writeFileSync(join(dir, 'ulobdev.8'), ulobdevManPage({ date, version }));
writeFileSync(join(dir, 'ulohttp.8'), ulohttpManPage({ date, version }));
