// uloop-writer: writers with recomputable content, for the uloop VM tests.
//
//   uloop-writer write DEV BS FIRST COUNT WRITERS GEN [FSYNC_EVERY [PAUSE_US]]
//       WRITERS processes write blocks [FIRST, FIRST + COUNT) of DEV, each exactly once, block b by
//       writer b % WRITERS, in a shuffled order, O_DIRECT, whole blocks of pattern(b, GEN); with
//       FSYNC_EVERY > 0 each writer fsyncs DEV after every FSYNC_EVERY blocks; each pauses
//       PAUSE_US microseconds after every write (to spread the writes over time).
//   uloop-writer hammer DEV BS FIRST COUNT SECONDS GEN0 [PAUSE_US]
//       one process rewriting random blocks of the range for SECONDS with pattern(b, gen) for an
//       increasing gen from GEN0, pausing PAUSE_US after each; prints how many writes it made.
//   uloop-writer check FILE BS BITMAP GEN      for each block set in BITMAP (one bit per block, LSB
//       first), compares block b of FILE with pattern(b, GEN); prints "checked N wrong M"
//   uloop-writer expect FILE BS FIRST COUNT GEN   the same for a range; exits 1 on a mismatch
//   uloop-writer fill FILE BS FIRST COUNT GEN    writes the pattern into FILE (expected images)
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static uint64_t splitmix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

static void pattern(uint64_t *buf, uint64_t bs, uint64_t b, uint64_t gen) {
  for (uint64_t i = 0; i < bs / 8; i++) buf[i] = splitmix(b * 1000003 + gen * 7919 + i);
}

static int usage(void) {
  fprintf(stderr, "usage: see the top of test/vm/uloop-writer.c\n");
  return 2;
}

static int cmd_write(char **argv, int argc) {
  uint64_t bs = strtoull(argv[3], 0, 0), first = strtoull(argv[4], 0, 0), count = strtoull(argv[5], 0, 0);
  int writers = atoi(argv[6]);
  uint64_t gen = strtoull(argv[7], 0, 0);
  int every = argc > 8 ? atoi(argv[8]) : 0, pause_us = argc > 9 ? atoi(argv[9]) : 0;
  for (int w = 0; w < writers; w++) {
    if (fork()) continue;
    int fd = open(argv[2], O_WRONLY | O_DIRECT);
    uint64_t *buf = aligned_alloc(4096, bs), n = 0, *order = malloc(sizeof(uint64_t) * (count / writers + 1));
    if (fd < 0 || !buf || !order) perror("open"), _exit(1);
    for (uint64_t b = first; b < first + count; b++)
      if (b % writers == (uint64_t)w) order[n++] = b;
    srand(w * 7 + 1);
    for (uint64_t i = n; i > 1; i--) {
      uint64_t j = rand() % i, t = order[i - 1];
      order[i - 1] = order[j];
      order[j] = t;
    }
    for (uint64_t i = 0; i < n; i++) {
      pattern(buf, bs, order[i], gen);
      if (pwrite(fd, buf, bs, order[i] * bs) != (ssize_t)bs) perror("pwrite"), _exit(1);
      if (every && (i + 1) % every == 0 && fsync(fd)) perror("fsync"), _exit(1);
      if (pause_us) usleep(pause_us);
    }
    _exit(0);
  }
  int st, bad = 0;
  while (wait(&st) > 0) bad |= !WIFEXITED(st) || WEXITSTATUS(st);
  return bad;
}

static int cmd_hammer(char **argv) {
  uint64_t bs = strtoull(argv[3], 0, 0), first = strtoull(argv[4], 0, 0), count = strtoull(argv[5], 0, 0);
  int seconds = atoi(argv[6]);
  uint64_t gen = strtoull(argv[7], 0, 0), n = 0;
  int pause_us = argv[8] ? atoi(argv[8]) : 0;
  int fd = open(argv[2], O_WRONLY | O_DIRECT);
  uint64_t *buf = aligned_alloc(4096, bs);
  if (fd < 0 || !buf) return perror("open"), 1;
  time_t end = time(0) + seconds;
  srand(getpid());
  while (time(0) < end) {
    uint64_t b = first + rand() % count;
    pattern(buf, bs, b, gen + n);
    if (pwrite(fd, buf, bs, b * bs) != (ssize_t)bs) return perror("pwrite"), 1;
    n++;
    if (pause_us) usleep(pause_us);
  }
  printf("hammer: %llu writes\n", (unsigned long long)n);
  return 0;
}

static int cmd_check(char **argv, int range) {
  uint64_t bs = strtoull(argv[3], 0, 0), checked = 0, wrong = 0, first = 0, count = 0, gen;
  uint8_t *bits = 0;
  int fd = open(argv[2], O_RDONLY);
  if (fd < 0) return perror("open"), 2;
  if (range) {
    first = strtoull(argv[4], 0, 0);
    count = strtoull(argv[5], 0, 0);
    gen = strtoull(argv[6], 0, 0);
  } else {
    int bf = open(argv[4], O_RDONLY);
    struct stat st;
    if (bf < 0 || fstat(bf, &st)) return perror("bitmap"), 2;
    bits = malloc(st.st_size);
    if (read(bf, bits, st.st_size) != st.st_size) return perror("read bitmap"), 2;
    count = st.st_size * 8;
    gen = strtoull(argv[5], 0, 0);
  }
  uint64_t *want = malloc(bs), *got = malloc(bs);
  for (uint64_t i = 0; i < count; i++) {
    if (bits && !(bits[i / 8] >> (i % 8) & 1)) continue;
    uint64_t b = first + i;
    pattern(want, bs, b, gen);
    checked++;
    if (pread(fd, got, bs, b * bs) != (ssize_t)bs || memcmp(want, got, bs)) {
      if (wrong < 5) printf("block %llu differs\n", (unsigned long long)b);
      wrong++;
    }
  }
  printf("checked %llu wrong %llu\n", (unsigned long long)checked, (unsigned long long)wrong);
  return range && wrong;
}

static int cmd_fill(char **argv) {
  uint64_t bs = strtoull(argv[3], 0, 0), first = strtoull(argv[4], 0, 0), count = strtoull(argv[5], 0, 0);
  uint64_t gen = strtoull(argv[6], 0, 0), *buf = malloc(bs);
  int fd = open(argv[2], O_WRONLY | O_CREAT, 0644);
  if (fd < 0) return perror("open"), 1;
  for (uint64_t b = first; b < first + count; b++) {
    pattern(buf, bs, b, gen);
    if (pwrite(fd, buf, bs, b * bs) != (ssize_t)bs) return perror("pwrite"), 1;
  }
  return 0;
}

int main(int argc, char **argv) {
  if (argc >= 8 && !strcmp(argv[1], "write")) return cmd_write(argv, argc);
  if ((argc == 8 || argc == 9) && !strcmp(argv[1], "hammer")) return cmd_hammer(argv);
  if (argc == 6 && !strcmp(argv[1], "check")) return cmd_check(argv, 0);
  if (argc == 7 && !strcmp(argv[1], "expect")) return cmd_check(argv, 1);
  if (argc == 7 && !strcmp(argv[1], "fill")) return cmd_fill(argv);
  return usage();
}
