#!/usr/bin/env node
// Where a VM test's guest script spends its time: reads the xtrace that test/support/vm.ts keeps
// with ULOBVM_TRACE=DIR (bash -x, each line "+<guest epoch seconds> command", one more "+" per
// command substitution level) and prints seconds per kind of command (ulobdev CLI starts, node -e,
// sleep, fio, dd, ...) and the longest single commands. A line's time is the time to the next line
// of the trace, so background jobs blur it; the totals still show where the guest waited.
//   node scripts/vm/trace-summary.mjs TRACE.log [TOP]
import { readFileSync } from 'node:fs';

const [file, topArg] = process.argv.slice(2);
if (!file) {
  console.error('usage: trace-summary.mjs TRACE.log [TOP]');
  process.exit(2);
}
const lines = readFileSync(file, 'utf8')
  .split('\n')
  .map((l) => /^(\++)(\d+\.\d+) (.*)$/.exec(l))
  .filter(Boolean)
  .map((m) => ({ depth: m[1].length, t: Number(m[2]), cmd: m[3] }));

/** The kind of a traced command, by its first word (the CLI bundle and node -e told apart). */
function kind(cmd) {
  if (/ulobdev\.bundle\.js/.test(cmd)) {
    const sub = /bundle\.js\s+(status|flush|detach|attach|list)\b/.exec(cmd);
    return `ulobdev ${sub ? sub[1] : 'attach/run'}`;
  }
  const w = cmd.split(/\s+/)[0];
  if (w === 'node') return 'node -e';
  return w;
}

const byKind = new Map();
const single = [];
for (let i = 0; i < lines.length - 1; i++) {
  const dt = lines[i + 1].t - lines[i].t;
  const k = kind(lines[i].cmd);
  const e = byKind.get(k) ?? { s: 0, n: 0 };
  e.s += dt;
  e.n += 1;
  byKind.set(k, e);
  single.push({ dt, cmd: lines[i].cmd });
}
const total = lines.length ? lines[lines.length - 1].t - lines[0].t : 0;
console.log(`traced ${lines.length} commands over ${total.toFixed(1)} s of guest time`);
for (const [k, e] of [...byKind].sort((a, b) => b[1].s - a[1].s).slice(0, 20)) console.log(`${e.s.toFixed(1).padStart(8)} s ${String(e.n).padStart(5)}x  ${k}`);
console.log('longest commands:');
for (const e of single.sort((a, b) => b.dt - a.dt).slice(0, Number(topArg ?? 25))) console.log(`${e.dt.toFixed(1).padStart(8)} s  ${e.cmd.slice(0, 150)}`);
