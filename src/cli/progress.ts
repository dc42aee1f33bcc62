// A progress bar for long work the daemon does (a flush, hydration), drawn with cli-progress on
// stderr and only when stderr is a terminal: rate and time left from the daemon's own counters,
// polled over the control socket. Off a terminal nothing is drawn (logs and pipes stay clean).
import { createRequire } from 'node:module';
import type CliProgress from 'cli-progress';
import { formatBytes } from '../units.js';

// cli-progress is loaded only when a bar is drawn (a command on a terminal), not by every start.
const requireCjs = createRequire(import.meta.url);

export interface ProgressSample {
  done: number;
  total: number;
}

/**
 * Polls `sample` every `everyMs` and draws `label [bar] 42% | 1.2 GiB of 3 GiB | 85 MiB/s |
 * 23 s left` until stop() is called. A sample of null (nothing running yet) draws nothing.
 * Returns null when stderr is not a terminal.
 */
export function progressBar(label: string, sample: () => Promise<ProgressSample | null>, everyMs = 500): { stop(): void } | null {
  if (!process.stderr.isTTY) return null;
  const cliProgress = requireCjs('cli-progress') as typeof CliProgress;
  const bar = new cliProgress.SingleBar(
    {
      stream: process.stderr,
      format: `${label} [{bar}] {percentage}% | {doneText} of {totalText} | {rateText} | {eta_formatted} left`,
      barsize: 30,
      hideCursor: true,
      clearOnComplete: true,
      etaBuffer: 20,
      fps: 4,
    },
    cliProgress.Presets.legacy,
  );
  let started = false;
  let last: { at: number; done: number } | null = null;
  let rate = 0;
  const tick = async () => {
    const s = await sample().catch(() => null);
    if (!s || s.total <= 0) return;
    const now = Date.now();
    if (last && now > last.at) rate = 0.7 * rate + (0.3 * (s.done - last.done) * 1000) / (now - last.at);
    last = { at: now, done: s.done };
    const payload = { doneText: formatBytes(s.done), totalText: formatBytes(s.total), rateText: `${formatBytes(Math.max(0, Math.round(rate)))}/s` };
    if (!started) {
      bar.start(s.total, s.done, payload);
      started = true;
    } else {
      bar.setTotal(s.total);
      bar.update(s.done, payload);
    }
  };
  void tick();
  const timer = setInterval(() => void tick(), everyMs);
  return {
    stop() {
      clearInterval(timer);
      if (started) bar.stop();
    },
  };
}
