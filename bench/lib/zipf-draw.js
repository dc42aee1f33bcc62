// The requests bench/budget.js replays on every cache and bench/budget-model.js replays through the
// engine's eviction policy: fio's own zipf:1.1 draw (randseed 42), so both see the same sequence.
import { execFileSync } from 'node:child_process';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

/**
 * fio's zipf:1.1 (randseed 42) over a sparse file of `diskMb` MiB in `dir`, ioengine=null (nothing
 * read), --write_iolog: the first `count` 4 KiB reads as "OFFSET LENGTH" strings (bytes), in fio's
 * order (fewer if fio drew fewer). Needs fio.
 */
export function drawZipfReads(dir, diskMb, count) {
  const img = join(dir, 'seq.img');
  const log = join(dir, 'seq.iolog');
  writeFileSync(img, '');
  execFileSync('truncate', ['-s', `${diskMb}M`, img]);
  try {
    execFileSync('fio', ['--name=seq', `--filename=${img}`, '--rw=randread', '--random_distribution=zipf:1.1', '--bs=4k', '--ioengine=null',
      `--size=${diskMb}M`, `--io_size=${Math.ceil((count * 4) / 1024) + diskMb}M`, `--number_ios=${count}`, '--randseed=42', `--write_iolog=${log}`, '--output=/dev/null']);
    // fio version 3 iolog: "<ms> <file> read <offset> <length>"
    return readFileSync(log, 'utf8').split('\n').filter((l) => / read \d+ \d+$/.test(l)).map((l) => l.split(' ').slice(-2).join(' ')).slice(0, count);
  } finally {
    rmSync(img, { force: true });
    rmSync(log, { force: true });
  }
}
