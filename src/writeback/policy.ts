// The write-back options as typed on the command line, parsed and validated before anything is
// opened: a bad value is one line and changes nothing.
import { createRequire } from 'node:module';
import type * as CronModule from 'cron';
import { InvalidArgumentError } from '../errors.js';
import { parseSize } from '../units.js';

/**
 * The cron package, loaded on first use: an attach without --flush (a restart of a daemon
 * with no schedule) does not pay for it and luxon.
 */
export function cronModule(): typeof CronModule {
  return createRequire(import.meta.url)('cron') as typeof CronModule;
}

/** A dirty-data limit: bytes, or a percentage of the disk. */
export type DirtyLimit = { bytes: number } | { percent: number };

const CRON_USAGE = "it takes 5 fields (minute hour day-of-month month day-of-week; or 6, seconds first), e.g. '*/30 * * * *' for every 30 minutes";

/** The fields of a 5-field expression, or of a 6-field one (seconds first), with their ranges. */
const FIELDS_5 = [
  { name: 'minute', unit: 'minutes', min: 0, max: 59 },
  { name: 'hour', unit: 'hours', min: 0, max: 23 },
  { name: 'day-of-month', unit: 'days', min: 1, max: 31 },
  { name: 'month', unit: 'months', min: 1, max: 12 },
  { name: 'day-of-week', unit: 'weekdays', min: 0, max: 7 },
];
const FIELDS_6 = [{ name: 'second', unit: 'seconds', min: 0, max: 59 }, ...FIELDS_5];

/**
 * Checks a cron expression (5 fields, or 6 with seconds first, or an @alias) with cron's own
 * parser, and what that parser lets through: a step larger than its field (`*\/70` in the
 * minute field fires hourly, at minute 0 only) and an expression that never fires (30 February).
 * Returns it trimmed; InvalidArgumentError says what is wrong in one line.
 */
export function parseCron(text: string): string {
  const expr = text.trim().replace(/\s+/g, ' ');
  const fields = expr.split(' ');
  const quoted = `'${text}'`;
  if (!expr.startsWith('@') && fields.length !== 5 && fields.length !== 6) {
    throw new InvalidArgumentError(`--flush ${quoted} is not a cron expression: ${CRON_USAGE}`);
  }
  if (!expr.startsWith('@')) {
    // Our own reading of each field first: cron's messages ("Field value (25) is out of range",
    // "Unknown alias: o") name no field and say nothing of what would work.
    const specs = fields.length === 6 ? FIELDS_6 : FIELDS_5;
    const problems = fields.map((field, i) => fieldProblem(field, specs[i]!)).filter((p) => p !== undefined);
    // Words in place of fields ("run at 3 am daily" has 5): more than one field is no cron field.
    const wordy = fields.filter((f, i) => /[a-z]/i.test(f) && fieldProblem(f, specs[i]!) !== undefined);
    if (wordy.length > 1) {
      throw new InvalidArgumentError(`--flush ${quoted} is not a cron expression: ${CRON_USAGE}`);
    }
    if (problems.length > 0) throw new InvalidArgumentError(`--flush ${quoted}: ${problems[0]}; ${CRON_EXAMPLE}`);
  }
  const { CronTime, validateCronExpression } = cronModule();
  if (!validateCronExpression(expr).valid) {
    // What cron refuses beyond fieldProblem (an unknown @alias): the usage, not cron's text.
    throw new InvalidArgumentError(`--flush ${quoted} is not a cron expression: ${CRON_USAGE}`);
  }
  if (!expr.startsWith('@')) {
    const specs = fields.length === 6 ? FIELDS_6 : FIELDS_5;
    fields.forEach((field, i) => checkSteps(field, specs[i]!, quoted));
  }
  // An expression that never fires (30 February) is valid syntax but useless; cron's message
  // ("Something went wrong. No execution date was found in the next 8 years") is not ours to show.
  try {
    new CronTime(expr).sendAt();
  } catch {
    throw new InvalidArgumentError(`--flush ${quoted} never fires: no date has that day-of-month in that month; ${CRON_EXAMPLE}`);
  }
  return expr;
}

/** A schedule that works, for the end of a refusal. */
const CRON_EXAMPLE = "e.g. '0 3 * * *' flushes at 03:00 every day, '*/30 * * * *' every 30 minutes";

/**
 * What is wrong with one field of a 5- or 6-field expression (`hour 25 is out of range 0-23`,
 * `minute 'O' is not a number (0-59)`), or undefined when cron can read it: lists of `*`, a
 * number or a name (month and day-of-week only), or a range of them, each with an optional /step.
 */
function fieldProblem(field: string, spec: (typeof FIELDS_6)[number]): string | undefined {
  const names = FIELD_NAMES[spec.name];
  const what = names ? names.what : `a number (${spec.min}-${spec.max})`;
  const value = (token: string): number | string => {
    if (/^\d+$/.test(token)) {
      const n = Number(token);
      return n < spec.min || n > spec.max ? `${spec.name} ${token} is out of range ${spec.min}-${spec.max}` : n;
    }
    const i = names ? names.names.indexOf(token.toLowerCase()) : -1;
    if (i >= 0) return spec.name === 'month' ? i + 1 : i;
    return `${spec.name} '${token}' is not ${what}`;
  };
  for (const part of field.split(',')) {
    const m = /^([^/]*)(?:\/(.*))?$/.exec(part)!;
    const [base, step] = [m[1]!, m[2]];
    if (step !== undefined && !/^[1-9]\d*$/.test(step)) return `the step /${step} in the ${spec.name} field must be a whole number from 1`;
    if (base === '*') continue;
    const ends = base.split('-');
    if (ends.length > 2 || ends.some((e) => e === '')) {
      return `${spec.name} '${part}' is not ${what}, a range (1-5), a list (1,15) or a step (*/10)`;
    }
    const values: number[] = [];
    for (const end of ends) {
      const v = value(end);
      if (typeof v === 'string') return v;
      values.push(v);
    }
    if (values.length === 2 && values[0]! > values[1]!) {
      return `the ${spec.name} range ${base} runs backwards (cron does not wrap around): write ${ends[0]}-${spec.max},${spec.min}-${ends[1]}`;
    }
  }
  return undefined;
}

/** The names cron takes in the month and day-of-week fields (any case), as a user would type them. */
const FIELD_NAMES: Record<string, { names: readonly string[]; what: string }> = {
  month: { names: ['jan', 'feb', 'mar', 'apr', 'may', 'jun', 'jul', 'aug', 'sep', 'oct', 'nov', 'dec'], what: 'a month (jan-dec or 1-12)' },
  'day-of-week': { names: ['sun', 'mon', 'tue', 'wed', 'thu', 'fri', 'sat'], what: 'a day (mon-sun or 0-7)' },
};

/** Refuses `BASE/STEP` parts whose step leaves only the start of their range. */
function checkSteps(field: string, spec: (typeof FIELDS_6)[number], quoted: string): void {
  for (const part of field.split(',')) {
    const m = /^(\*|(\d+)(?:-(\d+))?)\/(\d+)$/.exec(part);
    if (!m) continue;
    const from = m[1] === '*' ? spec.min : Number(m[2]);
    const to = m[1] === '*' || m[3] === undefined ? spec.max : Number(m[3]);
    const step = Number(m[4]);
    if (step > to - from) {
      throw new InvalidArgumentError(
        `--flush ${quoted}: the step /${step} in the ${spec.name} field is larger than ${spec.unit} ${from}-${to}, so it fires at ${spec.name} ${from} only; use a step from 1 to ${Math.max(1, to - from)}`,
      );
    }
  }
}

/** Schedules firing more often than this keep the disk from sleeping: warned about. */
const MIN_SENSIBLE_INTERVAL_MS = 5 * 60_000;

/**
 * A warning for a schedule that fires more often than every 5 minutes (the disk spins up at each
 * flush that finds dirty data, and never sleeps), or undefined. Most often a 6-field expression
 * read as 5: its first field is seconds. Takes a valid expression (parseCron's).
 */
export function cronWarning(expr: string): string | undefined {
  const times = new (cronModule().CronTime)(expr).sendAt(24).map((t) => t.toMillis());
  let gap = Infinity;
  for (let i = 1; i < times.length; i++) gap = Math.min(gap, times[i]! - times[i - 1]!);
  if (!(gap < MIN_SENSIBLE_INTERVAL_MS)) return undefined;
  const every = gap < 60_000 ? `${Math.round(gap / 1000)} s` : `${Math.round(gap / 60_000)} min`;
  const fields = expr.split(' ');
  const hint =
    fields.length === 6
      ? ` (6 fields: the first is seconds; '${[fields[0], ...fields.slice(2)].join(' ')}' is every ${fields[0]!.replace(/^\*\//, '')} minutes)`
      : '';
  return `--flush '${expr}' fires every ${every}: the disk spins up that often and never sleeps${hint}`;
}

/**
 * --cache-size: 256M, 500G, or 25% (of the disk). At least 1 MiB; a percentage above 0 and at
 * most 100.
 */
export function parseCacheSize(text: string): DirtyLimit {
  const pct = /^\s*(\d+(?:\.\d+)?)\s*%\s*$/.exec(text);
  if (pct) {
    const percent = Number(pct[1]);
    if (!(percent > 0 && percent <= 100)) throw new InvalidArgumentError(`--cache-size ${text}: a percentage must be above 0 and at most 100`);
    return { percent };
  }
  // A bare number (newuser10: "64" was "less than 1M") and a size past any disk (10000000T was
  // "neither a size nor a percentage") get their own lines.
  const bare = /^\s*(\d+(?:\.\d+)?)\s*$/.exec(text);
  if (bare && Number(bare[1]) === 0) {
    throw new InvalidArgumentError('--cache-size 0 is no cache: give the flash the cache may take, such as 256M or 25%, or leave --cache-size out for a full mirror of the disk');
  }
  if (bare) {
    const share = Number(bare[1]) > 0 && Number(bare[1]) <= 100 ? `${bare[1]}% for a share of the disk, or ` : '';
    throw new InvalidArgumentError(`--cache-size ${bare[1]} has no unit: write ${share}a size such as ${bare[1]}M or ${bare[1]}G`);
  }
  let bytes: number;
  try {
    bytes = parseSize(text);
  } catch (err) {
    // Only an overflow is "larger than any disk" (newuser13: 1.8T got that line for a fraction).
    const reason = err instanceof InvalidArgumentError ? err.reason : undefined;
    if (reason === 'too-large') {
      throw new InvalidArgumentError(`--cache-size ${text.trim()} is larger than any disk: give the flash the cache may take, such as 500G, or a percentage of the disk (25%)`);
    }
    if (reason === 'fraction') {
      throw new InvalidArgumentError(`--cache-size ${text.trim()} is not a whole number of bytes: give a unit (${text.trim().replace(/\s*b$/i, '')}M) or whole bytes`);
    }
    throw new InvalidArgumentError(`--cache-size ${JSON.stringify(text)} is neither a size (256M, 500G) nor a percentage of the disk (25%)`);
  }
  if (bytes < 1 << 20) throw new InvalidArgumentError(`--cache-size ${text} is less than 1M; a cache budget needs at least a few eviction units (256K each)`);
  return { bytes };
}

/** --eviction-unit: a power of two from 64K to 1M. */
export function parseEvictionUnit(text: string): number {
  let bytes: number;
  try {
    bytes = parseSize(text);
  } catch {
    throw new InvalidArgumentError(`--eviction-unit ${JSON.stringify(text)} is not a size (64K, 256K, 1M)`);
  }
  if (bytes < 65536 || bytes > 1 << 20 || (bytes & (bytes - 1)) !== 0) {
    throw new InvalidArgumentError(`--eviction-unit ${text}: give a power of two from 64K to 1M`);
  }
  return bytes;
}

/**
 * 512M, 2G, 4096B, or 10% of the disk. A bare number is refused: bcache's writeback_percent has
 * taught users to mean percent, and as bytes it would flush at every write.
 */
export function parseDirtyLimit(text: string): DirtyLimit {
  const pct = /^\s*(\d+(?:\.\d+)?)\s*%\s*$/.exec(text);
  if (pct) {
    const percent = Number(pct[1]);
    if (!(percent > 0 && percent <= 100)) throw new InvalidArgumentError(`--dirty-max ${text}: a percentage must be above 0 and at most 100`);
    return { percent };
  }
  const bare = /^\s*(\d+(?:\.\d+)?)\s*$/.exec(text);
  if (bare && Number(bare[1]) > 0) {
    // Only a number a percentage can be is suggested as one (newuser9: "512%" was suggested, then refused).
    const share = Number(bare[1]) <= 100 ? `${bare[1]}% for a share of the disk, or ` : '';
    throw new InvalidArgumentError(`--dirty-max ${bare[1]} has no unit: write ${share}a size such as ${bare[1]}M or ${bare[1]}G`);
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

/**
 * Bytes per second for a hydration rate (`--hydrate-rate RATE` at attach, `hydrate --rate RATE`):
 * 50M means 50 MiB/s; 0 means no limit (as fast as user I/O allows, what the control socket's
 * rate 0 means). `option` names the option in the error. Throws InvalidArgumentError.
 */
export function parseRate(text: string, option = '--hydrate-rate'): number {
  let bytes: number;
  try {
    bytes = parseSize(text.replace(/\/s$/i, ''));
  } catch {
    throw new InvalidArgumentError(`${option} ${JSON.stringify(text)} is not a rate (try 50M for 50 MiB/s, or 0 for no limit)`);
  }
  if (bytes !== 0 && bytes < 4096) throw new InvalidArgumentError(`${option} must be at least 4K per second (or 0 for no limit)`);
  return bytes;
}
