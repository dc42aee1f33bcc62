// `ulobdev report --svg`: dirty bytes over time as a step line, flush windows as bands (red when a
// flush failed), spin-ups as marks on the time axis. A hand-written SVG string: no dependencies.
import type { DirtySample, EventRecord, FlushRecord } from '../cache/metadata.js';
import { formatBytes } from '../units.js';

export interface ReportData {
  since: number;
  now: number;
  size: number;
  flushes: FlushRecord[];
  samples: DirtySample[];
  events: EventRecord[];
}

const W = 960;
const H = 360;
const M = { left: 80, right: 20, top: 40, bottom: 50 };

function esc(text: string): string {
  return text.replace(/[&<>"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' })[c]!);
}

export function renderReportSvg(data: ReportData, options: { title?: string } = {}): string {
  const t0 = data.since;
  const t1 = Math.max(data.now, t0 + 1);
  const maxDirty = Math.max(1, ...data.samples.map((s) => s.dirtyBytes));
  const pw = W - M.left - M.right;
  const ph = H - M.top - M.bottom;
  const x = (t: number) => M.left + ((Math.min(Math.max(t, t0), t1) - t0) / (t1 - t0)) * pw;
  const y = (b: number) => M.top + ph - (b / maxDirty) * ph;
  const f = (n: number) => n.toFixed(1);
  const out: string[] = [];
  out.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="12">`);
  out.push(`<rect width="${W}" height="${H}" fill="white"/>`);
  if (options.title) out.push(`<text x="${M.left}" y="22" font-size="15">${esc(options.title)}</text>`);
  // Flush windows.
  for (const fl of data.flushes) {
    const a = x(fl.startedAt);
    const b = x(fl.endedAt ?? data.now);
    const color = fl.error ? '#f4b6b6' : '#b9dcf4';
    const label = fl.error ? `flush failed: ${fl.error}` : `flush ${new Date(fl.startedAt).toISOString()}: ${formatBytes(fl.bytes)}${fl.spunUp ? ', spun the disk up' : ''}`;
    out.push(`<rect class="flush" x="${f(a)}" y="${M.top}" width="${f(Math.max(1.5, b - a))}" height="${ph}" fill="${color}"><title>${esc(label)}</title></rect>`);
  }
  // Axes and grid.
  for (let i = 0; i <= 4; i++) {
    const v = (maxDirty * i) / 4;
    out.push(`<line x1="${M.left}" x2="${W - M.right}" y1="${f(y(v))}" y2="${f(y(v))}" stroke="#ddd"/>`);
    out.push(`<text x="${M.left - 6}" y="${f(y(v) + 4)}" text-anchor="end">${esc(formatBytes(Math.round(v)))}</text>`);
  }
  for (let i = 0; i <= 6; i++) {
    const t = t0 + ((t1 - t0) * i) / 6;
    const d = new Date(t);
    const label = `${String(d.getHours()).padStart(2, '0')}:${String(d.getMinutes()).padStart(2, '0')}`;
    out.push(`<text x="${f(x(t))}" y="${H - M.bottom + 18}" text-anchor="middle">${label}</text>`);
  }
  out.push(`<line x1="${M.left}" x2="${W - M.right}" y1="${M.top + ph}" y2="${M.top + ph}" stroke="#333"/>`);
  out.push(`<line x1="${M.left}" x2="${M.left}" y1="${M.top}" y2="${M.top + ph}" stroke="#333"/>`);
  // Dirty bytes as a step line.
  if (data.samples.length > 0) {
    const pts: string[] = [];
    let prev: number | null = null;
    for (const s of data.samples) {
      if (prev !== null) pts.push(`${f(x(s.at))},${f(y(prev))}`);
      pts.push(`${f(x(s.at))},${f(y(s.dirtyBytes))}`);
      prev = s.dirtyBytes;
    }
    pts.push(`${f(x(data.now))},${f(y(prev!))}`);
    out.push(`<polyline class="dirty" fill="none" stroke="#c0392b" stroke-width="1.5" points="${pts.join(' ')}"/>`);
  }
  // Spin-ups: triangles under the axis (filled: caused by a flush; hollow: observed).
  for (const e of data.events) {
    if (!e.kind.startsWith('spinup')) continue;
    const cx = x(e.at);
    const by = M.top + ph + 2;
    const fill = e.kind === 'spinup-caused' ? '#222' : 'none';
    out.push(`<path class="spinup" d="M${f(cx)},${f(by)} l-5,9 h10 z" fill="${fill}" stroke="#222"><title>${esc(`${e.kind} ${new Date(e.at).toISOString()}${e.detail ? ` (${e.detail})` : ''}`)}</title></path>`);
  }
  const ly = H - 12;
  out.push(`<rect x="${M.left}" y="${ly - 9}" width="12" height="10" fill="#b9dcf4"/><text x="${M.left + 16}" y="${ly}">flush</text>`);
  out.push(`<line x1="${M.left + 70}" x2="${M.left + 90}" y1="${ly - 4}" y2="${ly - 4}" stroke="#c0392b" stroke-width="1.5"/><text x="${M.left + 94}" y="${ly}">dirty bytes</text>`);
  out.push(`<path d="M${M.left + 185},${ly - 9} l-5,9 h10 z" fill="#222"/><text x="${M.left + 194}" y="${ly}">spin-up (hollow: not ours)</text>`);
  out.push('</svg>');
  return out.join('\n') + '\n';
}
