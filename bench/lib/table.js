// Tiny helpers shared by the benches: an aligned plain-text table for stdout, and a JSON result
// file (parent directories created). No dependencies, no colours: output is meant to be pasted.
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';

/**
 * Renders rows as an aligned table.
 * columns: [{ key, title, align?: 'left' | 'right' }]; rows: objects whose values are strings or
 * numbers (numbers right-aligned by default). Returns the text, one line per row, no trailing newline.
 */
export function renderTable(columns, rows) {
  const cell = (row, col) => {
    const v = row[col.key];
    return v === undefined || v === null ? '' : String(v);
  };
  const rightAligned = columns.map((col) => col.align ? col.align === 'right' : rows.some((r) => typeof r[col.key] === 'number'));
  const widths = columns.map((col, i) => Math.max(col.title.length, ...rows.map((r) => cell(r, columns[i]).length)));
  const pad = (text, i) => (rightAligned[i] ? text.padStart(widths[i]) : text.padEnd(widths[i]));
  const line = (texts) => texts.map(pad).join(' | ').trimEnd();
  return [
    line(columns.map((c) => c.title)),
    widths.map((w) => '-'.repeat(w)).join('-|-'),
    ...rows.map((r) => line(columns.map((c) => cell(r, c)))),
  ].join('\n');
}

/** Prints a table to stdout, with an optional title line above and note lines below. */
export function printTable(columns, rows, { title, notes = [] } = {}) {
  const parts = [];
  if (title) parts.push(title);
  parts.push(renderTable(columns, rows));
  for (const n of notes) parts.push(n);
  process.stdout.write(parts.join('\n') + '\n');
}

/** Writes `data` as indented JSON to `path`, creating its directory. */
export function writeJson(path, data) {
  mkdirSync(dirname(path), { recursive: true });
  writeFileSync(path, JSON.stringify(data, null, 2) + '\n');
}
