// The write-back options as parsed (src/writeback/policy.ts) and the report SVG.
import { describe, expect, it } from 'vitest';
import { cronWarning, dirtyLimitBytes, parseCacheSize, parseCron, parseDirtyLimit, parseDuration, parseRate } from '../../src/writeback/policy.js';
import { renderReportSvg } from '../../src/writeback/report.js';
import { InvalidArgumentError } from '../../src/errors.js';
import { parseSize } from '../../src/units.js';

/** The message `f` throws (it must throw). */
function refusal(f: () => unknown): string {
  try {
    f();
  } catch (err) {
    return (err as Error).message;
  }
  throw new Error('no refusal');
}

describe('write-back options', () => {
  it('accepts 5- and 6-field cron expressions and refuses bad ones in one line', () => {
    expect(parseCron(' */30 * * * * ')).toBe('*/30 * * * *');
    expect(parseCron('*/2 * * * * *')).toBe('*/2 * * * * *');
    for (const bad of ['61 * * * *', 'bogus', '* * *', '0 0 30 2 *']) {
      expect(() => parseCron(bad)).toThrow(/^--flush '[^']*'(: | is not a cron expression| never fires)/);
      try {
        parseCron(bad);
      } catch (err) {
        expect((err as Error).message).not.toContain('\n');
        expect((err as { code: string }).code).toBe('ULOB_E_INVALID_ARG');
      }
    }
  });

  it('refuses a step larger than its field, which cron would run at the field\'s start only', () => {
    // '*/70' in the minute field is accepted by cron and fires hourly, not every 70 minutes.
    expect(() => parseCron('*/70 * * * *')).toThrow(/^--flush '\*\/70 \* \* \* \*': the step \/70 in the minute field is larger than minutes 0-59/);
    expect(() => parseCron('0 */25 * * *')).toThrow(/step \/25 in the hour field .*0-23/);
    expect(() => parseCron('0 0 */40 * *')).toThrow(/day-of-month field/);
    expect(() => parseCron('*/90 * * * * *')).toThrow(/second field/);
    expect(() => parseCron('30-50/30 * * * *')).toThrow(/step \/30 .* minutes 30-50/);
    expect(parseCron('*/59 * * * *')).toBe('*/59 * * * *');
    expect(parseCron('0 */12 * * *')).toBe('0 */12 * * *');
    expect(parseCron('5,*/15 * * * mon-fri')).toBe('5,*/15 * * * mon-fri');
  });

  it('says what a cron expression is when given words', () => {
    for (const words of ['every 30 minutes', 'hourly', '30m']) {
      expect(() => parseCron(words)).toThrow(/^--flush .* is not a cron expression: it takes 5 fields \(minute hour day-of-month month day-of-week; or 6, seconds first\), e\.g\. '\*\/30 \* \* \* \*' for every 30 minutes$/);
    }
    expect(parseCron('@hourly')).toBe('@hourly');
  });

  it('names the field whose name is a typo, in an expression of 5 fields', () => {
    expect(() => parseCron('*/30 * * * mon-fry')).toThrow(/^--flush '\*\/30 \* \* \* mon-fry': day-of-week 'fry' is not a day \(mon-sun or 0-7\); e\.g\. '0 3 \* \* \*' flushes at 03:00 every day, '\*\/30 \* \* \* \*' every 30 minutes$/);
    expect(() => parseCron('0 3 * jna *')).toThrow(/^--flush '0 3 \* jna \*': month 'jna' is not a month \(jan-dec or 1-12\); e\.g\./);
    expect(() => parseCron('0 0 * * 1,fry')).toThrow(/day-of-week 'fry' is not a day/);
    // Words in place of fields stay a usage message, whatever their count.
    expect(() => parseCron('run at 3 am daily')).toThrow(/it takes 5 fields/);
  });

  // newuser7 items 13-15: cron's own text ("Field value (25) is out of range", "Something went
  // wrong. No execution date was found...", "Unknown alias: o") named no field and no way out.
  it('names the field that is wrong and what it takes, and gives a schedule that works', () => {
    const example = "; e.g. '0 3 * * *' flushes at 03:00 every day, '*/30 * * * *' every 30 minutes";
    const cases: Array<[string, string]> = [
      ['O 3 * * *', "minute 'O' is not a number (0-59)"],
      ['0 25 * * *', 'hour 25 is out of range 0-23'],
      ['0 3 * * 8', 'day-of-week 8 is out of range 0-7'],
      ['0 3 32 * *', 'day-of-month 32 is out of range 1-31'],
      ['0 3 * 13 *', 'month 13 is out of range 1-12'],
      ['61 * * * *', 'minute 61 is out of range 0-59'],
      ['mon * * * *', "minute 'mon' is not a number (0-59)"],
      ['0 22-2 * * *', 'the hour range 22-2 runs backwards (cron does not wrap around): write 22-23,0-2'],
      ['*/0 * * * *', 'the step /0 in the minute field must be a whole number from 1'],
      ['? * * * *', "minute '?' is not a number (0-59)"],
      ['1-2-3 * * * *', "minute '1-2-3' is not a number (0-59), a range (1-5), a list (1,15) or a step (*/10)"],
      ['70 * * * * *', 'second 70 is out of range 0-59'],
    ];
    for (const [expr, why] of cases) {
      expect(refusal(() => parseCron(expr)), expr).toBe(`--flush '${expr}': ${why}${example}`);
    }
    expect(refusal(() => parseCron('0 3 31 2 *'))).toBe(`--flush '0 3 31 2 *' never fires: no date has that day-of-month in that month${example}`);
    for (const expr of ['0 25 * * *', '0 3 31 2 *', 'O 3 * * *', '@bogus']) {
      expect(() => parseCron(expr)).not.toThrow(/Field value|out of range\)|Something went wrong|Unknown alias|cannot be parsed/);
    }
    // What cron takes stays taken.
    for (const ok of ['0 3 * * 7', '0 3 * * sun', '0 3 * * mon-fri', '0 0 1 jan *', '0 8-18/2 * * 1-5', '0,30 * * * *', '*/30 * * * * *', '@daily']) {
      expect(parseCron(ok), ok).toBe(ok);
    }
  });

  it('warns when a schedule fires more often than every 5 minutes', () => {
    const six = cronWarning('*/30 * * * * *');
    expect(six).toMatch(/^--flush '\*\/30 \* \* \* \* \*' fires every 30 s: the disk spins up that often and never sleeps/);
    expect(six).toMatch(/6 fields: the first is seconds; '\*\/30 \* \* \* \*' is every 30 minutes/);
    expect(cronWarning('* * * * *')).toMatch(/fires every 1 min/);
    expect(cronWarning('*/4 * * * *')).toMatch(/fires every 4 min/);
    expect(cronWarning('*/5 * * * *')).toBeUndefined();
    expect(cronWarning('*/30 * * * *')).toBeUndefined();
    expect(cronWarning('0 3 * * *')).toBeUndefined();
    expect(cronWarning('@hourly')).toBeUndefined();
  });

  it('takes --dirty-max as a size or a percentage of the disk', () => {
    expect(parseDirtyLimit('512M')).toEqual({ bytes: 512 << 20 });
    expect(parseDirtyLimit('10%')).toEqual({ percent: 10 });
    expect(dirtyLimitBytes({ percent: 10 }, 1000)).toBe(100);
    for (const bad of ['0', '0%', '101%', 'lots']) expect(() => parseDirtyLimit(bad)).toThrow(/--dirty-max/);
  });

  it('refuses a --dirty-max without a unit: bcache users mean percent, the old parser read bytes', () => {
    expect(() => parseDirtyLimit('10')).toThrow(/^--dirty-max 10 has no unit: write 10% for a share of the disk, or a size such as 10M or 10G$/);
    expect(() => parseDirtyLimit('4096')).toThrow(/has no unit/);
    // A number no percentage can be is not suggested as one (newuser9: '512%' was refused in turn).
    expect(() => parseDirtyLimit('512')).toThrow(/^--dirty-max 512 has no unit: write a size such as 512M or 512G$/);
    expect(parseDirtyLimit('4096B')).toEqual({ bytes: 4096 });
    expect(parseDirtyLimit('2G')).toEqual({ bytes: 2 * 2 ** 30 });
    expect(parseDirtyLimit('1.5GiB')).toEqual({ bytes: 1.5 * 2 ** 30 });
  });

  it('says what is wrong with a --cache-size: no unit, larger than any disk, not a size (newuser10)', () => {
    expect(parseCacheSize('256M')).toEqual({ bytes: 256 << 20 });
    expect(parseCacheSize('25%')).toEqual({ percent: 25 });
    expect(() => parseCacheSize('64')).toThrow(/^--cache-size 64 has no unit: write 64% for a share of the disk, or a size such as 64M or 64G$/);
    expect(() => parseCacheSize('4096')).toThrow(/^--cache-size 4096 has no unit: write a size such as 4096M or 4096G$/);
    expect(() => parseCacheSize('10000000T')).toThrow(/^--cache-size 10000000T is larger than any disk: give the flash the cache may take/);
    // A fraction of a unit is rounded down to whole bytes (newuser13: 1.8T and 0.3G were "larger than any disk").
    expect(parseCacheSize('1.8T')).toEqual({ bytes: Math.floor(1.8 * 2 ** 40) });
    expect(parseCacheSize('0.3G')).toEqual({ bytes: Math.floor(0.3 * 2 ** 30) });
    expect(() => parseCacheSize('1048576.5B')).toThrow(/^--cache-size 1048576.5B is not a whole number of bytes/);
    // parseSize's reason decides, not its words (nits14 finding 4).
    for (const [text, reason] of [['10000000T', 'too-large'], ['1.5', 'fraction'], ['12Q', 'not-a-size']] as const) {
      let err: unknown;
      try {
        parseSize(text);
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(InvalidArgumentError);
      expect((err as InvalidArgumentError).reason, text).toBe(reason);
    }
    expect(parseDirtyLimit('0.3G')).toEqual({ bytes: Math.floor(0.3 * 2 ** 30) });
    expect(() => parseCacheSize('lots')).toThrow(/^--cache-size "lots" is neither a size \(256M, 500G\) nor a percentage of the disk \(25%\)$/);
    expect(() => parseCacheSize('512K')).toThrow(/is less than 1M/);
    expect(() => parseCacheSize('0')).toThrow(/^--cache-size 0 is no cache: give the flash the cache may take, such as 256M or 25%, or leave --cache-size out/);
  });

  it('takes durations in s, m, h, d and combinations', () => {
    expect(parseDuration('30m', '--max-dirty-age')).toBe(30 * 60_000);
    expect(parseDuration('2h', '--max-dirty-age')).toBe(7_200_000);
    expect(parseDuration('1h30m', '--max-dirty-age')).toBe(5_400_000);
    expect(parseDuration('90s', '--max-dirty-age')).toBe(90_000);
    for (const bad of ['30', 'm', '10x', '500ms']) expect(() => parseDuration(bad, '--max-dirty-age')).toThrow(/--max-dirty-age/);
  });

  it('takes hydration rates per second', () => {
    expect(parseRate('50M')).toBe(50 << 20);
    expect(parseRate('50M/s')).toBe(50 << 20);
    expect(() => parseRate('1')).toThrow(/at least/);
    expect(() => parseRate('/dev/loop3')).toThrow(/^--hydrate-rate "\/dev\/loop3" is not a rate \(try 50M for 50 MiB\/s, or 0 for no limit\)$/);
    // 0 is no limit, as the control socket's rate 0 (newuser12 F3); the message names the option used.
    expect(parseRate('0')).toBe(0);
    expect(() => parseRate('1', '--rate')).toThrow(/^--rate must be at least 4K per second \(or 0 for no limit\)$/);
  });
});

describe('report --svg', () => {
  it('draws dirty bytes, flush windows and spin-ups', () => {
    const t = 1_700_000_000_000;
    const svg = renderReportSvg({
      since: t,
      now: t + 3600_000,
      size: 1 << 30,
      samples: [
        { at: t + 60_000, dirtyBytes: 1 << 20 },
        { at: t + 600_000, dirtyBytes: 8 << 20 },
        { at: t + 1_200_000, dirtyBytes: 0 },
      ],
      flushes: [
        { id: 1, epoch: 1, startedAt: t + 1_100_000, endedAt: t + 1_150_000, bytes: 8 << 20, blocks: 2048, spunUp: true, error: null },
        { id: 2, epoch: 2, startedAt: t + 2_000_000, endedAt: t + 2_000_500, bytes: 0, blocks: 0, spunUp: false, error: 'EIO <disk>' },
      ],
      events: [{ at: t + 1_100_000, kind: 'spinup-caused', detail: 'schedule' }],
    });
    expect(svg.startsWith('<svg')).toBe(true);
    expect(svg.match(/class="flush"/g)).toHaveLength(2);
    expect(svg.match(/class="spinup"/g)).toHaveLength(1);
    expect(svg).toContain('class="dirty"');
    expect(svg).toContain('EIO &lt;disk&gt;');
    expect(svg).toContain('8 MiB');
  });
});
