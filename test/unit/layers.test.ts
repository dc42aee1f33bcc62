// The layering of src/ as docs/design.md draws it, checked on the import graph. Every relative
// import counts, type-only ones and re-exports included (read with TypeScript's own scanner,
// ts.preProcessFile). The rule:
//   - src/ is in layers, lowest first (LAYERS below); a module imports only from its own layer or
//     lower ones, so only cli/ imports cli/ and nothing imports upward;
//   - the graph has no cycle, not even a type-only one;
//   - every folder of src/ has a place in LAYERS.
import { readdirSync, readFileSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';
import { describe, expect, it } from 'vitest';

const SRC = resolve(dirname(fileURLToPath(import.meta.url)), '../../src');

/**
 * Lowest first. 'base' is the loose files directly in src/ (errors, validation, units, path
 * defaults, /proc readers): leaves that import nothing of ours but each other. 'index.ts' is the
 * library entry, a layer of its own below the commands.
 */
export const LAYERS = ['base', 'native', 'storage', 'source', 'cache', 'writeback', 'bdev', 'daemon', 'index.ts', 'cli'] as const;

/** The layer of a module, by its path relative to src/ ('cache/engine.ts' → 'cache'). */
export function layerOf(path: string): string {
  const parts = path.split('/');
  if (parts.length === 1) return parts[0] === 'index.ts' ? 'index.ts' : 'base';
  return parts[0]!;
}

export interface Violation {
  from: string;
  to: string;
  why: string;
}

/**
 * Checks a module graph (path relative to src/ → the modules it imports) against LAYERS. Returns
 * every upward import, every module of an unknown layer and every cycle (as its member list).
 */
export function checkLayers(graph: ReadonlyMap<string, readonly string[]>): { violations: Violation[]; cycles: string[][] } {
  const rank = (p: string) => (LAYERS as readonly string[]).indexOf(layerOf(p));
  const violations: Violation[] = [];
  for (const [from, imports] of graph) {
    if (rank(from) < 0) violations.push({ from, to: from, why: `${layerOf(from)}/ has no place in LAYERS` });
    for (const to of imports) {
      if (rank(to) > rank(from)) violations.push({ from, to, why: `${layerOf(from)} may not import ${layerOf(to)} (upward)` });
    }
  }
  return { violations, cycles: cyclesOf(graph) };
}

/** Strongly connected components with more than one member, or a module importing itself (Tarjan). */
function cyclesOf(graph: ReadonlyMap<string, readonly string[]>): string[][] {
  let next = 0;
  const index = new Map<string, number>();
  const low = new Map<string, number>();
  const stack: string[] = [];
  const onStack = new Set<string>();
  const out: string[][] = [];
  const visit = (v: string) => {
    index.set(v, next);
    low.set(v, next);
    next++;
    stack.push(v);
    onStack.add(v);
    for (const w of graph.get(v) ?? []) {
      if (!index.has(w)) {
        visit(w);
        low.set(v, Math.min(low.get(v)!, low.get(w)!));
      } else if (onStack.has(w)) {
        low.set(v, Math.min(low.get(v)!, index.get(w)!));
      }
    }
    if (low.get(v) === index.get(v)) {
      const scc: string[] = [];
      let w: string;
      do {
        w = stack.pop()!;
        onStack.delete(w);
        scc.push(w);
      } while (w !== v);
      if (scc.length > 1 || (graph.get(v) ?? []).includes(v)) out.push(scc.sort());
    }
  };
  for (const v of graph.keys()) if (!index.has(v)) visit(v);
  return out;
}

/** Every .ts module under src/ and the src/ modules it imports (relative specifiers, .js → .ts). */
export function importGraph(root = SRC): Map<string, string[]> {
  const graph = new Map<string, string[]>();
  const walk = (dir: string) => {
    for (const entry of readdirSync(dir, { withFileTypes: true })) {
      const path = join(dir, entry.name);
      if (entry.isDirectory()) walk(path);
      else if (entry.name.endsWith('.ts')) {
        const info = ts.preProcessFile(readFileSync(path, 'utf8'), true, true);
        const imports = info.importedFiles
          .map((f) => f.fileName)
          .filter((spec) => spec.startsWith('.'))
          .map((spec) => relative(root, resolve(dirname(path), spec)).replace(/\.js$/, '.ts'));
        graph.set(relative(root, path), [...new Set(imports)]);
      }
    }
  };
  walk(root);
  return graph;
}

describe('the layers of src/', () => {
  it('has no upward import and no cycle (type-only imports included)', () => {
    const graph = importGraph();
    expect(graph.size).toBeGreaterThan(30);
    for (const [from, imports] of graph) {
      for (const to of imports) expect(graph.has(to), `${from} imports ${to}, which does not exist`).toBe(true);
    }
    const { violations, cycles } = checkLayers(graph);
    expect(violations.map((v) => `${v.from} → ${v.to}: ${v.why}`)).toEqual([]);
    expect(cycles.map((c) => c.join(' ↔ '))).toEqual([]);
  });

  it('are the layers docs/design.md draws, in its order, one for each folder of src/', () => {
    const design = readFileSync(join(SRC, '../docs/design.md'), 'utf8');
    const at = design.indexOf('### Code layout');
    const block = design.slice(design.indexOf('```', at) + 3, design.indexOf('```', design.indexOf('```', at) + 3));
    const drawn = [...block.matchAll(/^  (\S+)/gm)].map((m) => (m[1] === '*.ts' ? 'base' : m[1]!.replace(/\/$/, '')));
    expect(drawn).toEqual([...LAYERS].reverse());
    const folders = readdirSync(SRC, { withFileTypes: true }).filter((e) => e.isDirectory()).map((e) => e.name);
    expect(folders.sort()).toEqual(LAYERS.filter((l) => l !== 'base' && l !== 'index.ts').sort());
  });

  it('the check itself fails on an upward import, a sideways one and a type-only cycle', () => {
    const graph = new Map<string, string[]>([
      ['errors.ts', []],
      ['cache/engine.ts', ['errors.ts', 'source/source.ts', 'cli/units.ts']],
      ['source/source.ts', ['cache/engine.ts']],
      ['writeback/power.ts', ['writeback/scheduler.ts', 'bdev/uloop.ts']],
      ['writeback/scheduler.ts', ['writeback/power.ts']],
      ['bdev/uloop.ts', []],
      ['cli/units.ts', ['errors.ts']],
      ['misc/thing.ts', []],
    ]);
    const { violations, cycles } = checkLayers(graph);
    expect(violations.map((v) => `${v.from} → ${v.to}`).sort()).toEqual([
      'cache/engine.ts → cli/units.ts',
      'misc/thing.ts → misc/thing.ts',
      'source/source.ts → cache/engine.ts',
      'writeback/power.ts → bdev/uloop.ts',
    ]);
    expect(cycles).toEqual(
      expect.arrayContaining([
        ['cache/engine.ts', 'source/source.ts'],
        ['writeback/power.ts', 'writeback/scheduler.ts'],
      ]),
    );
    expect(cycles).toHaveLength(2);
  });
});
