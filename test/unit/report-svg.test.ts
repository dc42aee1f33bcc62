// report --svg for a day with three flushes: each flush shows as a labelled band and a drop in the
// dirty line (samples before and after each flush), "now" and the next flush are marked, and the
// axis is dated. The times are local, as the chart's.
import { describe, expect, it } from 'vitest';
import { renderReportSvg, type ReportData } from '../../src/writeback/report.js';

const MIN = 60_000;
const MiB = 1 << 20;
const at = (h: number, m = 0) => new Date(2026, 2, 2, h, m).getTime(); // Mon 2 Mar 2026, local time

/** Writes of 1 MiB every 10 minutes from 08:00; flushes at 09:30, 12:00 and 16:30 (2 s each). */
function day(): ReportData {
  const flushAt = [at(9, 30), at(12), at(16, 30)];
  const samples = [];
  let dirty = 0;
  for (let t = at(8); t <= at(18); t += MIN) {
    if ((t - at(8)) % (10 * MIN) === 0) dirty += MiB;
    if (flushAt.includes(t)) {
      samples.push({ at: t, dirtyBytes: dirty }); // just before
      dirty = 0;
      samples.push({ at: t + 2000, dirtyBytes: 0 }); // just after
    } else samples.push({ at: t, dirtyBytes: dirty });
  }
  return {
    since: at(8),
    now: at(18),
    size: 1 << 40,
    flushes: flushAt.map((t, i) => ({ id: i + 1, epoch: i + 1, startedAt: t, endedAt: t + 2000, bytes: [10, 15, 27][i]! * MiB, blocks: 0, spunUp: true, error: null })),
    samples,
    events: flushAt.map((t) => ({ at: t, kind: 'spinup-caused', detail: 'schedule' })),
    nextFlushAt: at(18, 30),
  };
}

describe('report --svg', () => {
  const svg = renderReportSvg(day(), { title: '/dev/loop0: dirty data, flushes and spin-ups' });

  it('labels each flush with its time and size above a visible band', () => {
    const labels = [...svg.matchAll(/<text class="flush-label"[^>]*>([^<]*)<\/text>/g)].map((m) => m[1]);
    expect(labels).toEqual(['09:30 10 MiB', '12:00 15 MiB', '16:30 27 MiB']);
    for (const m of svg.matchAll(/<rect class="flush" x="[\d.]+" y="\d+" width="([\d.]+)"/g)) expect(Number(m[1])).toBeGreaterThanOrEqual(3);
  });

  it('draws the dirty line up to each flush and down after it', () => {
    const pts = /<polyline class="dirty"[^>]* points="([^"]*)"/.exec(svg)![1]!.split(' ').map((p) => p.split(',').map(Number) as [number, number]);
    const ys = pts.map(([, y]) => y);
    const top = Math.min(...ys);
    const bottom = Math.max(...ys);
    // Three drops from well above the axis to the axis, one per flush.
    let drops = 0;
    for (let i = 1; i < pts.length; i++) if (ys[i - 1]! < bottom - (bottom - top) / 4 && ys[i] === bottom) drops++;
    expect(drops).toBe(3);
  });

  it('marks now and the next flush, and dates the axis', () => {
    expect(svg).toContain('class="now"');
    expect(svg).toMatch(/>now 18:00</);
    expect(svg).toContain('class="next-flush"');
    expect(svg).toMatch(/>next flush 18:30</);
    expect(svg).toMatch(/<text class="date"[^>]*>Mon 2 Mar 2026<\/text>/);
    const ticks = [...svg.matchAll(/<text class="tick"[^>]*>(\d\d:\d\d)<\/text>/g)].map((m) => m[1]);
    expect(ticks[0]).toBe('08:00');
    expect(ticks.length).toBeGreaterThanOrEqual(5);
    expect(svg).toMatch(/3 flushes \(52 MiB\), 0 failed or running, 3 spin-ups/);
  });

  it('dates again at midnight on a chart that spans two days', () => {
    const d = day();
    const two = renderReportSvg({ ...d, since: at(20), now: at(20) + 24 * 60 * MIN, samples: [], flushes: [], events: [], nextFlushAt: null });
    expect([...two.matchAll(/<text class="date"[^>]*>([^<]*)</g)].map((m) => m[1])).toEqual(['Mon 2 Mar 2026', 'Tue 3 Mar 2026']);
  });

  it('draws 90 days and more of samples (200k, one a minute): no "Maximum call stack size exceeded" (newuser11 finding 2)', () => {
    const n = 200_000;
    const since = at(0) - n * MIN;
    const samples = Array.from({ length: n }, (_, i) => ({ at: since + i * MIN, dirtyBytes: (i % 1000) * MiB }));
    // The peak, once, in the middle: the y axis reaches it.
    samples[n / 2]!.dirtyBytes = 4096 * MiB;
    const big = renderReportSvg({ since, now: at(0), size: 1 << 40, samples, flushes: [], events: [], nextFlushAt: null });
    expect(big).toContain('>4 GiB</text>');
    expect(big).toContain('class="dirty"');
  });
});
