// `ulobdev report --svg`: dirty bytes over time as a step line (sampled every minute, and just
// before and after each flush, so each flush shows as a drop), flush windows as bands with their
// time and size written above (red when a flush failed), spin-ups as marks under the time axis, a
// line at "now" and one at the next scheduled flush. The time axis is dated. A hand-written SVG
// string: no dependencies.
import type { DirtySample, EventRecord, FlushRecord } from '../cache/metadata.js';
import { formatBytes } from '../units.js';

export interface ReportData {
  since: number;
  now: number;
  size: number;
  flushes: FlushRecord[];
  samples: DirtySample[];
  events: EventRecord[];
  /** The next scheduled flush (ms since the epoch), if a schedule is set and the device attached. */
  nextFlushAt?: number | null;
}

const W = 960;
const H = 380;
const M = { left: 80, right: 30, top: 60, bottom: 60 };
/** Flush labels above the plot only up to this many flushes; more would overlap. */
const MAX_FLUSH_LABELS = 16;
const DAYS = ['Sun', 'Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat'];
const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];

function esc(text: string): string {
  return text.replace(/[&<>"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' })[c]!);
}

function hhmm(t: number): string {
  const d = new Date(t);
  return `${String(d.getHours()).padStart(2, '0')}:${String(d.getMinutes()).padStart(2, '0')}`;
}

function day(t: number): string {
  const d = new Date(t);
  return `${DAYS[d.getDay()]} ${d.getDate()} ${MONTHS[d.getMonth()]} ${d.getFullYear()}`;
}

/** Tick spacing for a span: whole hours (1, 2, 3, 4, 6, 12, 24) or minutes for short spans. */
function tickStep(spanMs: number): number {
  const minutes = [1, 2, 5, 10, 15, 30, 60, 120, 180, 240, 360, 720, 1440];
  for (const m of minutes) if (spanMs / (m * 60_000) <= 8) return m * 60_000;
  return 1440 * 60_000 * Math.ceil(spanMs / (8 * 1440 * 60_000));
}

/** The SVG document (UTF-8 text) for `data`; times in the machine's local time zone. */
export function renderReportSvg(data: ReportData, options: { title?: string } = {}): string {
  const t0 = data.since;
  // The axis reaches the next flush when it is near (within a quarter of the span), so it shows.
  const next = data.nextFlushAt ?? null;
  const span0 = Math.max(data.now - t0, 1);
  const t1 = next !== null && next > data.now && next - data.now <= span0 / 4 ? next + span0 / 50 : Math.max(data.now, t0 + 1);
  // A loop, not Math.max(...samples): 90 days of samples (~130k) overflow the call stack as arguments.
  let maxDirty = 1;
  for (const s of data.samples) if (s.dirtyBytes > maxDirty) maxDirty = s.dirtyBytes;
  const pw = W - M.left - M.right;
  const ph = H - M.top - M.bottom;
  const x = (t: number) => M.left + ((Math.min(Math.max(t, t0), t1) - t0) / (t1 - t0)) * pw;
  const y = (b: number) => M.top + ph - (b / maxDirty) * ph;
  const f = (n: number) => n.toFixed(1);
  const out: string[] = [];
  out.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="12">`);
  out.push(`<rect width="${W}" height="${H}" fill="white"/>`);
  if (options.title) out.push(`<text x="${M.left}" y="20" font-size="15">${esc(options.title)}</text>`);
  const spinUps = data.events.filter((e) => e.kind.startsWith('spinup')).length;
  const done = data.flushes.filter((fl) => !fl.error && fl.endedAt !== null);
  out.push(
    `<text class="summary" x="${M.left}" y="38" fill="#555">${esc(
      `${day(t0)} ${hhmm(t0)} to ${day(data.now) === day(t0) ? '' : `${day(data.now)} `}${hhmm(data.now)}: ${done.length} flushes (${formatBytes(done.reduce((n, fl) => n + fl.bytes, 0))}), ${data.flushes.length - done.length} failed or running, ${spinUps} spin-ups`,
    )}</text>`,
  );
  // Flush windows: a band at least 3 px wide, the time and size above the plot.
  const labelled = data.flushes.length <= MAX_FLUSH_LABELS;
  for (const fl of data.flushes) {
    const a = x(fl.startedAt);
    const b = x(fl.endedAt ?? data.now);
    const color = fl.error ? '#f4b6b6' : '#b9dcf4';
    const label = fl.error ? `flush ${hhmm(fl.startedAt)} failed: ${fl.error}` : `flush ${new Date(fl.startedAt).toISOString()}: ${formatBytes(fl.bytes)}${fl.spunUp ? ', spun the disk up' : ''}`;
    out.push(`<rect class="flush" x="${f(a - 1)}" y="${M.top}" width="${f(Math.max(3, b - a))}" height="${ph}" fill="${color}"><title>${esc(label)}</title></rect>`);
    if (labelled) {
      out.push(`<text class="flush-label" x="${f(a)}" y="${M.top - 6}" text-anchor="middle" font-size="10" fill="${fl.error ? '#b03030' : '#2a6f9e'}">${esc(`${hhmm(fl.startedAt)} ${fl.error ? 'failed' : formatBytes(fl.bytes)}`)}</text>`);
    }
  }
  // Axes and grid; time ticks on round minutes or hours, the date under the first and each midnight.
  for (let i = 0; i <= 4; i++) {
    const v = (maxDirty * i) / 4;
    out.push(`<line x1="${M.left}" x2="${W - M.right}" y1="${f(y(v))}" y2="${f(y(v))}" stroke="#ddd"/>`);
    out.push(`<text x="${M.left - 6}" y="${f(y(v) + 4)}" text-anchor="end">${esc(formatBytes(Math.round(v)))}</text>`);
  }
  const step = tickStep(t1 - t0);
  const tz = new Date(t0).getTimezoneOffset() * 60_000;
  let lastDay = '';
  for (let t = Math.ceil((t0 - tz) / step) * step + tz; t <= t1; t += step) {
    out.push(`<line x1="${f(x(t))}" x2="${f(x(t))}" y1="${M.top + ph}" y2="${M.top + ph + 4}" stroke="#333"/>`);
    out.push(`<text class="tick" x="${f(x(t))}" y="${H - M.bottom + 18}" text-anchor="middle">${hhmm(t)}</text>`);
    if (day(t) !== lastDay) {
      lastDay = day(t);
      out.push(`<text class="date" x="${f(x(t))}" y="${H - M.bottom + 32}" text-anchor="middle" fill="#555">${esc(lastDay)}</text>`);
    }
  }
  out.push(`<line x1="${M.left}" x2="${W - M.right}" y1="${M.top + ph}" y2="${M.top + ph}" stroke="#333"/>`);
  out.push(`<line x1="${M.left}" x2="${M.left}" y1="${M.top}" y2="${M.top + ph}" stroke="#333"/>`);
  // Dirty bytes as a step line up to now.
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
  // Now, and the next scheduled flush.
  out.push(`<line class="now" x1="${f(x(data.now))}" x2="${f(x(data.now))}" y1="${M.top}" y2="${M.top + ph}" stroke="#333" stroke-dasharray="4 3"/>`);
  out.push(`<text x="${f(x(data.now) - 3)}" y="${M.top + 12}" text-anchor="end" font-size="10">now ${hhmm(data.now)}</text>`);
  if (next !== null && next > data.now && next <= t1) {
    out.push(`<line class="next-flush" x1="${f(x(next))}" x2="${f(x(next))}" y1="${M.top}" y2="${M.top + ph}" stroke="#2a6f9e" stroke-dasharray="2 3"/>`);
    out.push(`<text x="${f(x(next) + 3)}" y="${M.top + 24}" font-size="10" fill="#2a6f9e">next flush ${hhmm(next)}</text>`);
  }
  // Spin-ups: triangles under the axis (filled: caused by a flush; hollow: another program or a query).
  for (const e of data.events) {
    if (!e.kind.startsWith('spinup')) continue;
    const cx = x(e.at);
    const by = M.top + ph + 2;
    const fill = e.kind === 'spinup-caused' ? '#222' : 'none';
    out.push(`<path class="spinup" d="M${f(cx)},${f(by)} l-5,9 h10 z" fill="${fill}" stroke="#222"><title>${esc(`${e.kind} ${new Date(e.at).toISOString()}${e.detail ? ` (${e.detail})` : ''}`)}</title></path>`);
  }
  const ly = H - 10;
  out.push(`<rect x="${M.left}" y="${ly - 9}" width="12" height="10" fill="#b9dcf4"/><text x="${M.left + 16}" y="${ly}">flush</text>`);
  out.push(`<line x1="${M.left + 70}" x2="${M.left + 90}" y1="${ly - 4}" y2="${ly - 4}" stroke="#c0392b" stroke-width="1.5"/><text x="${M.left + 94}" y="${ly}">dirty bytes</text>`);
  out.push(`<path d="M${M.left + 185},${ly - 9} l-5,9 h10 z" fill="#222"/><text x="${M.left + 194}" y="${ly}">spin-up for a flush (hollow: not ours)</text>`);
  out.push('</svg>');
  return out.join('\n') + '\n';
}
