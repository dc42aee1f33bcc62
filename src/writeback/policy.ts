// The write-back options as typed on the command line, parsed and validated before anything is
// opened: a bad value is one line and changes nothing.
import { CronTime, validateCronExpression } from 'cron';
import { InvalidArgumentError } from '../errors.js';
import { parseSize } from '../units.js';

/** A dirty-data limit: bytes, or a percentage of the disk. */
export type DirtyLimit = { bytes: number } | { percent: number };

/** Checks a cron expression (5 fields, or 6 with seconds first); returns it trimmed. */
export function parseCron(text: string): string {
  const expr = text.trim();
  const check = validateCronExpression(expr);
  if (!check.valid) {
    const why = check.error instanceof Error ? check.error.message : String(check.error ?? 'invalid');
    throw new InvalidArgumentError(`--flush ${JSON.stringify(text)} is not a cron expression (${why.split('\n')[0]}); try '*/30 * * * *'`);
  }
  // An expression that never fires (30 February) is valid syntax but useless.
  try {
    new CronTime(expr).sendAt();
  } catch (err) {
    throw new InvalidArgumentError(`--flush ${JSON.stringify(text)} never fires (${(err as Error).message.split('\n')[0]})`);
  }
  return expr;
}

/** 512M, 2G, or 10% of the disk. */
export function parseDirtyLimit(text: string): DirtyLimit {
  const pct = /^\s*(\d+(?:\.\d+)?)\s*%\s*$/.exec(text);
  if (pct) {
    const percent = Number(pct[1]);
    if (!(percent > 0 && percent <= 100)) throw new InvalidArgumentError(`--dirty-max ${text}: a percentage must be above 0 and at most 100`);
    return { percent };
  }
  let bytes: number;
  try {
    bytes = parseSize(text);
  } catch {
    throw new InvalidArgumentError(`--dirty-max ${JSON.stringify(text)} is neither a size (512M, 2G) nor a percentage (10%)`);
  }
  if (bytes <= 0) throw new InvalidArgumentError('--dirty-max must be above 0');
  return { bytes };
}

export function dirtyLimitBytes(limit: DirtyLimit, diskSize: number): number {
  return 'bytes' in limit ? limit.bytes : Math.floor((diskSize * limit.percent) / 100);
}

const DURATION_UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** 90s, 30m, 2h, 1d, or combinations (1h30m); returns milliseconds. */
export function parseDuration(text: string, option: string): number {
  const t = text.trim().toLowerCase();
  const parts = [...t.matchAll(/(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)/g)];
  if (parts.length === 0 || parts.map((p) => p[0]).join('') !== t.replace(/\s+/g, '')) {
    throw new InvalidArgumentError(`${option} ${JSON.stringify(text)} is not a duration (try 90s, 30m, 2h, 1d)`);
  }
  const ms = parts.reduce((n, p) => n + Number(p[1]) * DURATION_UNITS[p[2]!]!, 0);
  if (!(ms >= 1000) || !Number.isSafeInteger(Math.round(ms))) throw new InvalidArgumentError(`${option} must be at least 1s`);
  return Math.round(ms);
}

/** Bytes per second for --hydrate [RATE]: 50M means 50 MiB/s. */
export function parseRate(text: string): number {
  let bytes: number;
  try {
    bytes = parseSize(text.replace(/\/s$/i, ''));
  } catch {
    throw new InvalidArgumentError(`--hydrate ${JSON.stringify(text)} is not a rate (try 50M for 50 MiB/s)`);
  }
  if (bytes < 4096) throw new InvalidArgumentError('--hydrate rate must be at least 4K per second');
  return bytes;
}
