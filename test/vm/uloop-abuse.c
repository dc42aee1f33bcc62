// uloop-abuse: bad input for every ioctl of /dev/uloop-control and the request channel, and
// ADD / REMOVE / ATTACH / QUERY / open racing, run in the test VM against uloop.ko. Each check
// prints "ok NAME" or "FAIL NAME: got X, want Y"; the last line is "abuse: N checks, M failed".
//   uloop-abuse CACHE_FILE RACE_SECONDS
// CACHE_FILE: a regular file of at least 64 MiB. Uses device indexes 5, 6 and 7.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../../kernel/include/uapi/uloop.h"

static int checks, failed;
static const char *cache_path;

static int ctl_open(void) {
  int fd = open("/dev/" ULOOP_CONTROL_NAME, O_RDWR | O_CLOEXEC);
  if (fd < 0) perror("open /dev/uloop-control"), exit(2);
  return fd;
}

// Expects `ret` (an ioctl-like result) to fail with `want` (0: to succeed).
static void expect(const char *name, long ret, int want) {
  int got = ret < 0 ? errno : 0;
  checks++;
  if (got == want) {
    printf("ok %s\n", name);
  } else {
    failed++;
    printf("FAIL %s: got %s, want %s\n", name, got ? strerrorname_np(got) : "success", want ? strerrorname_np(want) : "success");
  }
}

static uint8_t ones[1 << 16], zeros[1 << 16];

// A valid ADD over the cache file: 64 MiB, 64 KiB blocks, all present, write-back.
static struct uloop_add good_add(int cache_fd, uint32_t index) {
  struct uloop_add a = {.version = ULOOP_ABI_VERSION, .cache_fd = cache_fd, .size = 64 << 20, .block_size = 65536,
                        .flags = ULOOP_F_WRITEBACK, .present_ptr = (uintptr_t)ones, .dirty_ptr = (uintptr_t)zeros,
                        .index = index};
  return a;
}

// A whole-block O_DIRECT write of block `blk` of /dev/uloop5 in a child; returns its pid (exit 0: written).
static pid_t write_block(uint64_t blk) {
  pid_t pid = fork();
  if (!pid) {
    for (int fd = 3; fd < 256; fd++) close(fd); // a copy of the daemon's fd would keep it attached
    void *buf = aligned_alloc(4096, 65536);
    int d = open("/dev/uloop5", O_WRONLY | O_DIRECT);
    if (buf) memset(buf, 0x5a, 65536);
    _exit(buf && d >= 0 && pwrite(d, buf, 65536, blk * 65536) == 65536 ? 0 : 1);
  }
  return pid;
}

// An O_DIRECT write of blocks [blk, blk + n) of /dev/uloop5 in a child; returns its pid (exit 0: written).
static pid_t write_blocks(uint64_t blk, uint64_t n) {
  pid_t pid = fork();
  if (!pid) {
    for (int fd = 3; fd < 256; fd++) close(fd);
    void *buf = aligned_alloc(4096, n * 65536);
    int d = open("/dev/uloop5", O_WRONLY | O_DIRECT);
    if (buf) memset(buf, 0x5a, n * 65536);
    _exit(buf && d >= 0 && pwrite(d, buf, n * 65536, blk * 65536) == (ssize_t)(n * 65536) ? 0 : 1);
  }
  return pid;
}

// Reads one message within `ms` (the fd is O_NONBLOCK); 0 if none came.
static int read_msg(int ctl, struct uloop_msg *m, int ms) {
  struct pollfd pfd = {.fd = ctl, .events = POLLIN};
  return poll(&pfd, 1, ms) > 0 && read(ctl, m, sizeof(*m)) == sizeof(*m);
}

static void expect_exit(const char *name, pid_t pid, int want) {
  int st;
  waitpid(pid, &st, 0);
  checks++;
  if (WIFEXITED(st) && WEXITSTATUS(st) == want) printf("ok %s\n", name);
  else failed++, printf("FAIL %s: status %#x, want exit %d\n", name, st, want);
}

static void expect_unasked(int ctl, const char *name, uint64_t want) {
  struct uloop_info q = {.index = 5};
  checks++;
  if (ioctl(ctl, ULOOP_IOC_QUERY, &q) == 0 && q.unasked_blocks == want) printf("ok %s\n", name);
  else failed++, printf("FAIL %s: unasked=%llu, want %llu\n", name, (unsigned long long)q.unasked_blocks, (unsigned long long)want);
}

// The credit at work on device 5 (blocks 1..15 missing, the channel O_NONBLOCK): with a limit
// of 0 a write covering missing block 1 whole sends ROOM [1, 2) and waits for its answer; the
// answer lets it write; an error answer fails it and leaves the block missing; within the
// limit a write asks nothing.
static void credit_room(int ctl) {
  struct uloop_credit cr = {.flags = ULOOP_CREDIT_F_LIMIT, .limit = 0};
  expect("credit: limit 0", ioctl(ctl, ULOOP_IOC_CREDIT, &cr), 0);
  struct uloop_msg m;
  pid_t w = write_block(1);
  checks++;
  if (read_msg(ctl, &m, 10000) && m.type == ULOOP_MSG_ROOM && m.offset == 65536 && m.length == 65536) {
    printf("ok credit: a whole-block write over the limit sends ROOM\n");
    usleep(200000); // it waits for the answer: nothing written unasked yet
    expect_unasked(ctl, "credit: nothing unasked while ROOM waits", 0);
    struct uloop_reply rep = {.id = m.id};
    expect("credit: answer ROOM", write(ctl, &rep, sizeof(rep)), 0);
  } else {
    failed++;
    printf("FAIL credit: no ROOM for a write over the limit (type %u offset %llu)\n", m.type, (unsigned long long)m.offset);
  }
  expect_exit("credit: the write went on after ROOM", w, 0);
  expect_unasked(ctl, "credit: the granted block is unasked (pending)", 1);
  w = write_block(2);
  checks++;
  if (read_msg(ctl, &m, 10000) && m.type == ULOOP_MSG_ROOM && m.offset == 2 * 65536) {
    printf("ok credit: the next one asks too\n");
    struct uloop_reply rep = {.id = m.id, .error = -ENOSPC};
    expect("credit: ROOM answered with an error", write(ctl, &rep, sizeof(rep)), 0);
  } else {
    failed++, printf("FAIL credit: no second ROOM\n");
  }
  expect_exit("credit: a failed ROOM fails the write", w, 1);
  expect_unasked(ctl, "credit: the failed write took nothing", 1);
  cr = (struct uloop_credit){.flags = ULOOP_CREDIT_F_LIMIT, .limit = 2};
  expect("credit: limit 2", ioctl(ctl, ULOOP_IOC_CREDIT, &cr), 0);
  checks++;
  if (cr.limit == 2 && cr.unasked == 1) printf("ok credit: CREDIT returns the limit and the unasked count\n");
  else failed++, printf("FAIL credit: returned limit=%llu unasked=%llu\n", (unsigned long long)cr.limit, (unsigned long long)cr.unasked);
  w = write_block(3);
  expect_exit("credit: within the limit a write asks nothing", w, 0);
  checks++;
  if (!read_msg(ctl, &m, 300)) printf("ok credit: no message within the limit\n");
  else failed++, printf("FAIL credit: message type %u within the limit\n", m.type);
  expect_unasked(ctl, "credit: two unasked", 2);
  int fd = open("/dev/uloop5", O_RDWR); // a FLUSH hands them over: BARRIER
  pid_t f = fork();
  if (!f) _exit(fsync(fd) ? 1 : 0);
  checks++;
  if (read_msg(ctl, &m, 10000) && m.type == ULOOP_MSG_BARRIER) {
    struct uloop_reply rep = {.id = m.id};
    printf("ok credit: FLUSH sends the barrier\n");
    expect("credit: answer the barrier", write(ctl, &rep, sizeof(rep)), 0);
  } else {
    failed++, printf("FAIL credit: no barrier\n");
  }
  expect_exit("credit: FLUSH done", f, 0);
  close(fd);
  expect_unasked(ctl, "credit: none unasked after the barrier", 0);

  // ROOM carries the missing count (K3): blocks 1 and 3 are present and dirty, 2 and 4 missing;
  // a write over [1, 5) with the limit at 0 asks for 2 blocks, its span being [2, 5).
  cr = (struct uloop_credit){.flags = ULOOP_CREDIT_F_LIMIT, .limit = 0};
  expect("room count: limit 0", ioctl(ctl, ULOOP_IOC_CREDIT, &cr), 0);
  w = write_blocks(1, 4);
  checks++;
  if (read_msg(ctl, &m, 10000) && m.type == ULOOP_MSG_ROOM && m.offset == 2 * 65536 && m.length == 3 * 65536 &&
      m.epoch == 2) {
    printf("ok room count: ROOM asks for the 2 missing blocks of its span [2, 5)\n");
    struct uloop_reply rep = {.id = m.id}; // the answer raises the limit by the grant itself
    expect("room count: answer", write(ctl, &rep, sizeof(rep)), 0);
  } else {
    failed++, printf("FAIL room count: type %u offset %llu length %llu count %llu, want ROOM 131072 196608 2\n", m.type,
                     (unsigned long long)m.offset, (unsigned long long)m.length, (unsigned long long)m.epoch);
  }
  expect_exit("room count: the write went on", w, 0);
  checks++;
  if (!read_msg(ctl, &m, 300)) printf("ok room count: within the grant nothing more is asked\n");
  else failed++, printf("FAIL room count: message type %u after the grant\n", m.type);
  expect_unasked(ctl, "room count: the 2 blocks taken are unasked, no grant left", 2);
  struct uloop_info qc = {.index = 5};
  checks++;
  if (ioctl(ctl, ULOOP_IOC_QUERY, &qc) == 0 && qc.credit_limit == 2) printf("ok room count: the answer raised the limit by the grant\n");
  else failed++, printf("FAIL room count: limit %lld after the answer, want 2\n", (long long)qc.credit_limit);

  // BARRIER: the daemon's own barrier takes them (no FLUSH, no page cache): a caller on another
  // thread (here a child sharing the fd) waits for the BARRIER upcall's answer.
  pid_t b = fork();
  if (!b) {
    struct uloop_barrier ba = {0};
    _exit(ioctl(ctl, ULOOP_IOC_BARRIER, &ba) ? 100 : (int)ba.taken);
  }
  checks++;
  if (read_msg(ctl, &m, 10000) && m.type == ULOOP_MSG_BARRIER) {
    printf("ok barrier: the ioctl sends the barrier\n");
    expect_unasked(ctl, "barrier: unasked until the answer", 2);
    struct uloop_reply rep = {.id = m.id};
    expect("barrier: answer", write(ctl, &rep, sizeof(rep)), 0);
  } else {
    failed++, printf("FAIL barrier: no BARRIER upcall (type %u)\n", m.type);
  }
  expect_exit("barrier: returns the 2 blocks handed over", b, 2);
  expect_unasked(ctl, "barrier: none unasked after it", 0);
  struct uloop_barrier ba = {0};
  expect("barrier: nothing pending", ioctl(ctl, ULOOP_IOC_BARRIER, &ba), 0);
  checks++;
  if (ba.taken == 0 && !read_msg(ctl, &m, 300)) printf("ok barrier: nothing pending, no upcall, taken 0\n");
  else failed++, printf("FAIL barrier: taken=%llu with nothing pending\n", (unsigned long long)ba.taken);

  // A caller killed while it waits for the answer exits (the wait is killable); the set stays
  // pending; the late answer is accepted.
  cr = (struct uloop_credit){0};
  ioctl(ctl, ULOOP_IOC_CREDIT, &cr);
  expect_exit("barrier kill: a whole-block write", write_block(5), 0);
  b = fork();
  if (!b) {
    struct uloop_barrier kb = {0};
    ioctl(ctl, ULOOP_IOC_BARRIER, &kb);
    _exit(0);
  }
  checks++;
  if (read_msg(ctl, &m, 10000) && m.type == ULOOP_MSG_BARRIER) {
    kill(b, SIGKILL);
    int st, k;
    for (k = 0; k < 100 && waitpid(b, &st, WNOHANG) == 0; k++)
      usleep(50000);
    if (k < 100 && WIFSIGNALED(st)) printf("ok barrier kill: the killed caller exits\n");
    else failed++, printf("FAIL barrier kill: the caller did not exit in 5 s\n");
    expect_unasked(ctl, "barrier kill: the block stays pending", 1);
    struct uloop_reply rep = {.id = m.id};
    expect("barrier kill: the late answer is accepted", write(ctl, &rep, sizeof(rep)), 0);
  } else {
    failed++, printf("FAIL barrier kill: no BARRIER upcall (type %u)\n", m.type);
  }

  // A ROOM not read yet when the limit is lifted ends with no grant (K4): the write goes on and
  // the daemon never reads it. Raising the limit ends none (the daemon answers each ROOM after
  // raising the limit by its grant: the others would take that room too).
  cr = (struct uloop_credit){.flags = ULOOP_CREDIT_F_LIMIT, .limit = 0};
  expect("room end: limit 0", ioctl(ctl, ULOOP_IOC_CREDIT, &cr), 0);
  w = write_block(6);
  usleep(500000); // it sends its ROOM
  cr = (struct uloop_credit){.flags = ULOOP_CREDIT_F_LIMIT, .limit = 8};
  expect("room end: limit raised", ioctl(ctl, ULOOP_IOC_CREDIT, &cr), 0);
  checks++;
  if (read_msg(ctl, &m, 10000) && m.type == ULOOP_MSG_ROOM && m.offset == 6 * 65536) {
    printf("ok room end: a raised limit leaves the ROOM to the daemon\n");
    usleep(200000);
    cr = (struct uloop_credit){0};
    expect("credit: lifted", ioctl(ctl, ULOOP_IOC_CREDIT, &cr), 0);
    struct uloop_reply rep = {.id = m.id};
    expect("room end: answer the ROOM read before the lift", write(ctl, &rep, sizeof(rep)), 0);
  } else {
    failed++, printf("FAIL room end: no ROOM after the limit was raised (type %u)\n", m.type);
  }
  expect_exit("room end: that write went on", w, 0);
  cr = (struct uloop_credit){.flags = ULOOP_CREDIT_F_LIMIT, .limit = 0};
  expect("room end: limit 0 again", ioctl(ctl, ULOOP_IOC_CREDIT, &cr), 0);
  w = write_block(8);
  usleep(500000); // it sends its ROOM, not read
  cr = (struct uloop_credit){0};
  expect("room end: limit lifted", ioctl(ctl, ULOOP_IOC_CREDIT, &cr), 0);
  expect_exit("room end: the write went on without an answer", w, 0);
  checks++;
  if (!read_msg(ctl, &m, 300)) printf("ok room end: no ROOM left to read\n");
  else failed++, printf("FAIL room end: read type %u (offset %llu) after the limit was lifted\n", m.type, (unsigned long long)m.offset);
}

static uint64_t evict_one(int ctl, uint64_t blk) {
  uint8_t bit = 1;
  struct uloop_blocks r = {.first = blk, .count = 1, .bits_ptr = (uintptr_t)&bit};
  return ioctl(ctl, ULOOP_IOC_EVICT, &r) ? ~0ULL : r.done;
}

// A read of blocks [blk, blk + 2) of /dev/uloop5 in a child (exit 0: read).
static pid_t read_two(uint64_t blk) {
  pid_t pid = fork();
  if (!pid) {
    for (int fd = 3; fd < 256; fd++) close(fd);
    void *buf = aligned_alloc(4096, 2 * 65536);
    int d = open("/dev/uloop5", O_RDONLY | O_DIRECT);
    _exit(buf && d >= 0 && pread(d, buf, 2 * 65536, blk * 65536) == 2 * 65536 ? 0 : 1);
  }
  return pid;
}

static uint64_t evict_pinned(int ctl, uint64_t blk) {
  uint8_t bit = 1;
  struct uloop_blocks r = {.first = blk, .count = 1, .bits_ptr = (uintptr_t)&bit, .id = ULOOP_EVICT_F_PINNED};
  return ioctl(ctl, ULOOP_IOC_EVICT, &r) ? ~0ULL : r.done;
}

// EVICT leaves the blocks of a request still preparing (device 5, blocks 16..19 present and
// clean): a read A of 16..17 with 17 evicted waits for the MISS of 17, then a read B of 18..19
// with 19 evicted for the MISS of 19; meanwhile blocks 16 and 18 are not evicted (they would be
// filled again by the next pass, for ever with a small budget). ULOOP_EVICT_F_PINNED takes
// B's block 18 but not A's 16: the oldest request keeps its blocks (so it ends, then the next).
// After the reads block 16 is evicted as any other.
static void evict_preparing(int ctl) {
  checks++;
  if (evict_one(ctl, 17) == 1 && evict_one(ctl, 19) == 1) printf("ok preparing: blocks 17 and 19 evicted\n");
  else failed++, printf("FAIL preparing: blocks 17 and 19 not evicted\n");
  pid_t a = read_two(16);
  struct uloop_msg m, mb;
  checks++;
  if (!(read_msg(ctl, &m, 10000) && m.type == ULOOP_MSG_MISS && m.offset == 17 * 65536)) {
    failed++, printf("FAIL preparing: no MISS for block 17 (type %u offset %llu)\n", m.type, (unsigned long long)m.offset);
    return;
  }
  printf("ok preparing: the read asks for block 17\n");
  pid_t b = read_two(18);
  checks++;
  if (!(read_msg(ctl, &mb, 10000) && mb.type == ULOOP_MSG_MISS && mb.offset == 19 * 65536)) {
    failed++, printf("FAIL preparing: no MISS for block 19 (type %u offset %llu)\n", mb.type, (unsigned long long)mb.offset);
    return;
  }
  printf("ok preparing: the second read asks for block 19\n");
  uint64_t n = evict_one(ctl, 16), n18 = evict_one(ctl, 18);
  checks++;
  if (n == 0 && n18 == 0) printf("ok preparing: blocks 16 and 18 of the waiting reads are not evicted\n");
  else failed++, printf("FAIL preparing: EVICT of blocks 16 and 18 under waiting reads returned %lld and %lld\n", (long long)n, (long long)n18);
  n = evict_pinned(ctl, 16);
  checks++;
  if (n == 0) printf("ok preparing: with ULOOP_EVICT_F_PINNED the oldest read keeps block 16\n");
  else failed++, printf("FAIL preparing: EVICT with ULOOP_EVICT_F_PINNED of the oldest read's block 16 returned %lld\n", (long long)n);
  n18 = evict_pinned(ctl, 18);
  checks++;
  if (n18 == 1) printf("ok preparing: the pinned block 18 of the younger read is evicted with the flag\n");
  else failed++, printf("FAIL preparing: EVICT with ULOOP_EVICT_F_PINNED of block 18 returned %lld\n", (long long)n18);
  struct uloop_reply rep = {.id = m.id};
  expect("preparing: answer the MISS of 17", write(ctl, &rep, sizeof(rep)), 0);
  expect_exit("preparing: the oldest read is served", a, 0);
  rep = (struct uloop_reply){.id = mb.id};
  expect("preparing: answer the MISS of 19", write(ctl, &rep, sizeof(rep)), 0);
  checks++;
  if (read_msg(ctl, &m, 10000) && m.type == ULOOP_MSG_MISS && m.offset == 18 * 65536) {
    printf("ok preparing: the younger read asks for block 18 again\n");
    rep = (struct uloop_reply){.id = m.id};
    expect("preparing: answer the MISS of 18", write(ctl, &rep, sizeof(rep)), 0);
  } else {
    failed++, printf("FAIL preparing: no MISS for block 18 after the pinned EVICT (type %u offset %llu)\n", m.type,
                     (unsigned long long)m.offset);
  }
  expect_exit("preparing: the younger read is served", b, 0);
  checks++;
  if (evict_one(ctl, 16) == 1) printf("ok preparing: block 16 evicted once the read is done\n");
  else failed++, printf("FAIL preparing: block 16 not evicted after the read\n");

  // ULOOP_EVICT_F_HOLD: the evicted block 18 stays busy as a claim; a write covering it whole
  // waits (else the kernel writes it without asking and the daemon's punch, later, drops it);
  // FILLED with none set lets it go and the write goes on.
  uint8_t bit = 1;
  struct uloop_blocks h = {.first = 18, .count = 1, .bits_ptr = (uintptr_t)&bit, .id = ULOOP_EVICT_F_HOLD};
  expect("hold: EVICT with ULOOP_EVICT_F_HOLD", ioctl(ctl, ULOOP_IOC_EVICT, &h), 0);
  checks++;
  if (h.done == 1 && h.id > 0) printf("ok hold: block 18 evicted and held as a claim\n");
  else failed++, printf("FAIL hold: done=%llu id=%llu\n", (unsigned long long)h.done, (unsigned long long)h.id);
  pid_t w = write_block(18);
  usleep(500000);
  int st;
  checks++;
  if (waitpid(w, &st, WNOHANG) == 0) printf("ok hold: a whole-block write waits while the evicted block is held\n");
  else failed++, printf("FAIL hold: the write over the held block completed (status %#x)\n", st);
  uint8_t none = 0;
  struct uloop_blocks f = {.first = 18, .count = 1, .bits_ptr = (uintptr_t)&none, .id = h.id};
  expect("hold: FILLED with none set lets it go", ioctl(ctl, ULOOP_IOC_FILLED, &f), 0);
  if (h.id) expect_exit("hold: then the write goes on", w, 0);
  else kill(w, SIGKILL), waitpid(w, &st, 0);
}

static void add_refusals(void) {
  int ctl = ctl_open(), cache = open(cache_path, O_RDWR), ro = open(cache_path, O_RDONLY), wo = open(cache_path, O_WRONLY);
  int dir = open("/tmp", O_RDONLY | O_DIRECTORY), pipefd[2];
  if (pipe(pipefd)) exit(2);
  struct uloop_add a;
  char name[96];

#define ADD_EXPECT(label, mutate, want)            \
  do {                                             \
    a = good_add(cache, 5);                        \
    mutate;                                        \
    expect("add: " label, ioctl(ctl, ULOOP_IOC_ADD, &a), want); \
  } while (0)

  ADD_EXPECT("version 1", a.version = 1, EPROTO);
  ADD_EXPECT("unknown flag", a.flags |= 1U << 20, EOPNOTSUPP);
  ADD_EXPECT("reserved field", a.__reserved[1] = 1, EOPNOTSUPP);
  ADD_EXPECT("zero without writeback", a.flags = ULOOP_F_ZERO, EOPNOTSUPP);
  ADD_EXPECT("preserve without writeback", a.flags = ULOOP_F_PRESERVE, EOPNOTSUPP);
  uint32_t bad_bs[] = {0, 1, 512, 2048, 4095, 4097, 6144, 65535, 3 << 16, 2 << 20, 1U << 31, 0xffffffffU};
  for (size_t i = 0; i < sizeof(bad_bs) / sizeof(bad_bs[0]); i++) {
    snprintf(name, sizeof(name), "add: block size %u", bad_bs[i]);
    a = good_add(cache, 5);
    a.block_size = bad_bs[i];
    expect(name, ioctl(ctl, ULOOP_IOC_ADD, &a), EDOM);
  }
  uint32_t bad_lbs[] = {256, 3000, 8192, 65536};
  for (size_t i = 0; i < sizeof(bad_lbs) / sizeof(bad_lbs[0]); i++) {
    snprintf(name, sizeof(name), "add: logical block size %u", bad_lbs[i]);
    a = good_add(cache, 5);
    a.logical_block_size = bad_lbs[i];
    expect(name, ioctl(ctl, ULOOP_IOC_ADD, &a), ERANGE);
  }
  ADD_EXPECT("physical above a 4096 block size", (a.block_size = 4096, a.logical_block_size = 4096, a.physical_block_size = 8192), ERANGE);
  ADD_EXPECT("physical below logical", (a.logical_block_size = 4096, a.physical_block_size = 2048), ERANGE);
  ADD_EXPECT("physical not a power of two", a.physical_block_size = 12288, ERANGE);
  ADD_EXPECT("physical above the block size", a.physical_block_size = 131072, ERANGE);
  ADD_EXPECT("unit shift 21", (a.flags |= ULOOP_F_ACCESSED, a.unit_shift = 21), ERANGE);
  ADD_EXPECT("size 0", a.size = 0, EINVAL);
  ADD_EXPECT("size 1000", a.size = 1000, EINVAL);
  ADD_EXPECT("size not a multiple of a 4096 logical block", (a.logical_block_size = 4096, a.size = (64 << 20) - 512), EINVAL);
  ADD_EXPECT("size 2^63", a.size = 1ULL << 63, EFBIG);
  ADD_EXPECT("size 2^64 - 512", a.size = ~0ULL - 511, EFBIG);
  ADD_EXPECT("size one block past the maximum", (a.block_size = 4096, a.size = (ULOOP_MAX_BLOCKS + 1) * 4096), EFBIG);
  ADD_EXPECT("bitmaps one byte short", a.bitmap_length = 127, EMSGSIZE);
  ADD_EXPECT("index 70000", a.index = 70000, ENXIO);
  ADD_EXPECT("index 0xfffffffe", a.index = 0xfffffffe, ENXIO);
  ADD_EXPECT("cache fd -1", a.cache_fd = -1, EBADF);
  ADD_EXPECT("cache fd not open", a.cache_fd = 999, EBADF);
  ADD_EXPECT("cache a directory", a.cache_fd = dir, EBADFD);
  ADD_EXPECT("cache a pipe", a.cache_fd = pipefd[0], EBADFD);
  ADD_EXPECT("cache read-only in writeback", a.cache_fd = ro, EACCES);
  ADD_EXPECT("cache write-only", (a.cache_fd = wo, a.flags = 0), EACCES);
  ADD_EXPECT("cache shorter than the size", a.size = 128 << 20, EOVERFLOW);
  ADD_EXPECT("present bitmap unreadable", a.present_ptr = 1, EFAULT);
  ADD_EXPECT("dirty bitmap unreadable", a.dirty_ptr = (uintptr_t)-4096, EFAULT);
  expect("add: argument unreadable", ioctl(ctl, ULOOP_IOC_ADD, (void *)8), EFAULT);

  // nothing of the refused ADDs exists; a good one works, then a second on the same fd is refused
  struct uloop_info q = {.index = 5};
  expect("query: index of refused ADDs", ioctl(ctl, ULOOP_IOC_QUERY, &q), ENODEV);
  a = good_add(cache, 5);
  expect("add: good", ioctl(ctl, ULOOP_IOC_ADD, &a), 0);
  a = good_add(cache, 6);
  expect("add: fd already attached", ioctl(ctl, ULOOP_IOC_ADD, &a), EISCONN);
  int ctl2 = ctl_open();
  a = good_add(cache, 5);
  expect("add: index taken", ioctl(ctl2, ULOOP_IOC_ADD, &a), EEXIST);

  // QUERY / ATTACH / REMOVE
  q.index = 6;
  expect("query: no such device", ioctl(ctl2, ULOOP_IOC_QUERY, &q), ENODEV);
  q.index = 0xffffffff;
  expect("query: index 0xffffffff", ioctl(ctl2, ULOOP_IOC_QUERY, &q), ENODEV);
  expect("query: argument unreadable", ioctl(ctl2, ULOOP_IOC_QUERY, (void *)8), EFAULT);
  struct uloop_attach at = {.version = 1, .index = 5};
  expect("attach: version 1", ioctl(ctl2, ULOOP_IOC_ATTACH, &at), EPROTO);
  at.version = ULOOP_ABI_VERSION;
  expect("attach: device has a daemon", ioctl(ctl2, ULOOP_IOC_ATTACH, &at), EBUSY);
  at.index = 6;
  expect("attach: no such device", ioctl(ctl2, ULOOP_IOC_ATTACH, &at), ENODEV);
  at.index = 5;
  expect("attach: fd already attached", ioctl(ctl, ULOOP_IOC_ATTACH, &at), EISCONN);
  expect("attach: argument unreadable", ioctl(ctl2, ULOOP_IOC_ATTACH, (void *)8), EFAULT);
  at.index = 0xffffffff;
  expect("attach: index 0xffffffff", ioctl(ctl2, ULOOP_IOC_ATTACH, &at), ENODEV);
  at.index = 5;
  uint32_t idx = 6;
  expect("remove: no such device", ioctl(ctl2, ULOOP_IOC_REMOVE, &idx), ENODEV);
  expect("remove: argument unreadable", ioctl(ctl2, ULOOP_IOC_REMOVE, (void *)8), EFAULT);
  int dev = open("/dev/uloop5", O_RDONLY);
  idx = 5;
  expect("remove: while open", ioctl(ctl2, ULOOP_IOC_REMOVE, &idx), EBUSY);
  close(dev);

  // ioctls that need an attached fd, and bad ranges on an attached one
  struct uloop_blocks r = {.first = 0, .count = 1, .bits_ptr = (uintptr_t)zeros};
  expect("claim: not attached", ioctl(ctl2, ULOOP_IOC_CLAIM, &r), ENOTCONN);
  struct uloop_epoch e = {.dirty_ptr = (uintptr_t)zeros, .length = 128};
  expect("epoch begin: not attached", ioctl(ctl2, ULOOP_IOC_EPOCH_BEGIN, &e), ENOTCONN);
  expect("unknown ioctl of ours", ioctl(ctl, _IO(ULOOP_IOC_MAGIC, 0x7f)), ENOTTY);
  expect("foreign ioctl", ioctl(ctl, _IO('T', 1)), ENOTTY);
  struct uloop_barrier_bits bb = {.id = 12345, .present_ptr = (uintptr_t)zeros, .dirty_ptr = (uintptr_t)zeros, .length = 128};
  expect("barrier bits: not a barrier", ioctl(ctl, ULOOP_IOC_BARRIER_BITS, &bb), ENOENT);
  bb.length = 127;
  expect("barrier bits: buffers short", ioctl(ctl, ULOOP_IOC_BARRIER_BITS, &bb), EMSGSIZE);
  e.length = 127;
  expect("epoch begin: buffer short", ioctl(ctl, ULOOP_IOC_EPOCH_BEGIN, &e), EMSGSIZE);
  e.length = 128;
  e.epoch = 99;
  expect("epoch commit: no epoch open", ioctl(ctl, ULOOP_IOC_EPOCH_COMMIT, &e), ESTALE);
  expect("epoch begin", ioctl(ctl, ULOOP_IOC_EPOCH_BEGIN, &e), 0);
  uint64_t open_epoch = e.epoch;
  e.epoch = open_epoch + 1;
  expect("epoch commit: not the open epoch", ioctl(ctl, ULOOP_IOC_EPOCH_COMMIT, &e), ESTALE);
  e.epoch = open_epoch;
  e.dirty_ptr = 1;
  expect("epoch commit: set unreadable", ioctl(ctl, ULOOP_IOC_EPOCH_COMMIT, &e), EFAULT);
  e.dirty_ptr = (uintptr_t)zeros;
  expect("epoch commit: empty set", ioctl(ctl, ULOOP_IOC_EPOCH_COMMIT, &e), 0);
  struct {
    const char *name;
    unsigned long cmd;
    uint64_t first, count;
    int want;
  } ranges[] = {
      {"claim: count 0", ULOOP_IOC_CLAIM, 0, 0, EINVAL},
      {"claim: past the end", ULOOP_IOC_CLAIM, 1000, 100, EINVAL},
      {"claim: first past the end", ULOOP_IOC_CLAIM, 1024, 1, EINVAL},
      {"claim: first + count overflows", ULOOP_IOC_CLAIM, ~0ULL - 2, 8, EINVAL},
      {"claim: count over the limit", ULOOP_IOC_CLAIM, 0, ULOOP_MAX_RANGE_BLOCKS + 1, EINVAL},
      {"evict: count 0", ULOOP_IOC_EVICT, 5, 0, EINVAL},
      {"evict: past the end", ULOOP_IOC_EVICT, 1023, 2, EINVAL},
      {"filled: no such claim", ULOOP_IOC_FILLED, 0, 8, ENOENT},
      {"accessed: not enabled", ULOOP_IOC_ACCESSED, 0, 8, EOPNOTSUPP},
      {"release: not enabled", ULOOP_IOC_EPOCH_RELEASE, 0, 8, EOPNOTSUPP},
      {"claim: nothing to claim (all present)", ULOOP_IOC_CLAIM, 0, 1024, 0},
      {"evict: all present and clean", ULOOP_IOC_EVICT, 0, 16, 0},
  };
  for (size_t i = 0; i < sizeof(ranges) / sizeof(ranges[0]); i++) {
    memset(ones, 0xff, sizeof(ones));
    r = (struct uloop_blocks){.first = ranges[i].first, .count = ranges[i].count, .bits_ptr = (uintptr_t)ones,
                              .id = ranges[i].cmd == ULOOP_IOC_EVICT ? 0 : 77}; // EVICT: id holds flags
    expect(ranges[i].name, ioctl(ctl, ranges[i].cmd, &r), ranges[i].want);
  }
  memset(ones, 0xff, sizeof(ones));
  r = (struct uloop_blocks){.first = 0, .count = 8, .bits_ptr = (uintptr_t)ones, .__reserved = 1};
  expect("evict: reserved field", ioctl(ctl, ULOOP_IOC_EVICT, &r), EOPNOTSUPP);
  r = (struct uloop_blocks){.first = 0, .count = 8, .bits_ptr = 1};
  expect("evict: bitmap unreadable", ioctl(ctl, ULOOP_IOC_EVICT, &r), EFAULT);
  r = (struct uloop_blocks){.first = 0, .count = 8, .bits_ptr = (uintptr_t)ones, .id = 1ULL << 2};
  expect("evict: unknown flag", ioctl(ctl, ULOOP_IOC_EVICT, &r), EINVAL);
  r = (struct uloop_blocks){.first = 0, .count = 8, .bits_ptr = (uintptr_t)ones, .id = 77};
  expect("evict: a claim id where the flags go", ioctl(ctl, ULOOP_IOC_EVICT, &r), EINVAL);
  // BARRIER: its refusals
  struct uloop_barrier bq = {.flags = 1};
  expect("barrier: unknown flag", ioctl(ctl, ULOOP_IOC_BARRIER, &bq), EINVAL);
  bq = (struct uloop_barrier){.flags = 1U << 31};
  expect("barrier: high flag", ioctl(ctl, ULOOP_IOC_BARRIER, &bq), EINVAL);
  bq = (struct uloop_barrier){.__pad = 1};
  expect("barrier: pad set", ioctl(ctl, ULOOP_IOC_BARRIER, &bq), EOPNOTSUPP);
  bq = (struct uloop_barrier){.__reserved = {0, 1}};
  expect("barrier: reserved field", ioctl(ctl, ULOOP_IOC_BARRIER, &bq), EOPNOTSUPP);
  expect("barrier: unreadable", ioctl(ctl, ULOOP_IOC_BARRIER, (void *)8), EFAULT);
  bq = (struct uloop_barrier){0};
  expect("barrier: not attached", ioctl(ctl2, ULOOP_IOC_BARRIER, &bq), ENOTCONN);
  // CREDIT: its refusals (the limit stays unset), then a limit
  struct uloop_credit cr = {.limit = 4};
  expect("credit: a limit without the flag", ioctl(ctl, ULOOP_IOC_CREDIT, &cr), EINVAL);
  cr = (struct uloop_credit){.flags = 1U << 5};
  expect("credit: unknown flag", ioctl(ctl, ULOOP_IOC_CREDIT, &cr), EINVAL);
  cr = (struct uloop_credit){.flags = ULOOP_CREDIT_F_LIMIT, .limit = 1025};
  expect("credit: limit above the device's blocks", ioctl(ctl, ULOOP_IOC_CREDIT, &cr), EINVAL);
  cr = (struct uloop_credit){.flags = ULOOP_CREDIT_F_LIMIT, .limit = ~0ULL};
  expect("credit: limit 2^64 - 1", ioctl(ctl, ULOOP_IOC_CREDIT, &cr), EINVAL);
  cr = (struct uloop_credit){.flags = ULOOP_CREDIT_F_LIMIT, .__pad = 1};
  expect("credit: pad set", ioctl(ctl, ULOOP_IOC_CREDIT, &cr), EOPNOTSUPP);
  cr = (struct uloop_credit){.flags = ULOOP_CREDIT_F_LIMIT, .__reserved = {0, 1}};
  expect("credit: reserved field", ioctl(ctl, ULOOP_IOC_CREDIT, &cr), EOPNOTSUPP);
  expect("credit: unreadable", ioctl(ctl, ULOOP_IOC_CREDIT, (void *)8), EFAULT);
  expect("credit: not attached", ioctl(ctl2, ULOOP_IOC_CREDIT, &cr), ENOTCONN);
  q.index = 5;
  ioctl(ctl, ULOOP_IOC_QUERY, &q);
  checks++;
  if (q.credit_limit == ULOOP_CREDIT_NONE && q.unasked_blocks == 0) printf("ok credit: still none after the refusals\n");
  else failed++, printf("FAIL credit after the refusals: limit=%llu unasked=%llu\n", (unsigned long long)q.credit_limit, (unsigned long long)q.unasked_blocks);
  struct uloop_clear_error ce = {0};
  expect("clear error: none set", ioctl(ctl, ULOOP_IOC_CLEAR_ERROR, &ce), 0);
  checks++;
  if (ce.error) failed++, printf("FAIL clear error: error %d reported\n", ce.error);
  q.index = 5;
  ioctl(ctl, ULOOP_IOC_QUERY, &q);
  checks++;
  if (q.present_blocks != 1008 || q.dirty_blocks) // 16 of 1024 evicted above
    failed++, printf("FAIL state after the refusals: present=%llu dirty=%llu\n", (unsigned long long)q.present_blocks, (unsigned long long)q.dirty_blocks);
  else
    printf("ok state after the refusals: present=1008 dirty=0\n");

  // the request channel
  char small[16];
  expect("read: buffer smaller than a message", read(ctl, small, sizeof(small)), EINVAL);
  expect("read: not attached", read(ctl2, small, sizeof(small)), ENOTCONN);
  struct uloop_reply rep = {.id = 999999};
  expect("reply: id never sent", write(ctl, &rep, sizeof(rep)), ENOENT);
  rep.id = 0;
  expect("reply: id 0", write(ctl, &rep, sizeof(rep)), ENOENT);
  expect("reply: partial record", write(ctl, &rep, 8), EINVAL);
  rep.error = 5;
  expect("reply: positive error", write(ctl, &rep, sizeof(rep)), EINVAL);
  rep.error = -5000;
  expect("reply: error below -4095", write(ctl, &rep, sizeof(rep)), EINVAL);
  void *volatile unreadable = (void *)8;
  expect("reply: unreadable", write(ctl, unreadable, sizeof(rep)), EFAULT);
  expect("reply: not attached", write(ctl2, &rep, sizeof(rep)), ENOTCONN);

  // A message read into an unwritable buffer stays queued: the next read gets it.
  pid_t reader = fork();
  if (!reader) { // evict made blocks 0..15 missing: this read sends a MISS
    void *buf = aligned_alloc(4096, 4096);
    int d = open("/dev/uloop5", O_RDONLY | O_DIRECT);
    _exit(buf && d >= 0 && pread(d, buf, 4096, 0) == 4096 ? 0 : 1);
  }
  struct pollfd pfd = {.fd = ctl, .events = POLLIN};
  fcntl(ctl, F_SETFL, O_NONBLOCK); // never hang here: a missing message is a failure below
  poll(&pfd, 1, 10000);
  void *ro_page = mmap(0, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  expect("read: into a read-only page", read(ctl, ro_page, 4096), EFAULT);
  struct uloop_msg m[4];
  ssize_t n = poll(&pfd, 1, 5000) > 0 ? read(ctl, m, sizeof(m)) : -1;
  checks++;
  if (n == sizeof(m[0]) && m[0].type == ULOOP_MSG_MISS && m[0].offset == 0) {
    printf("ok read: the faulted message is read again\n");
    struct uloop_reply two[2] = {{.id = m[0].id}, {.id = m[0].id}};
    // the second, a duplicate, is refused: write returns the bytes of the first only
    checks++;
    ssize_t w = write(ctl, two, sizeof(two));
    if (w == sizeof(two[0])) printf("ok reply: a duplicate after a good one stops the batch\n");
    else failed++, printf("FAIL reply batch: wrote %zd\n", w);
  } else {
    failed++;
    printf("FAIL read: the faulted message is lost (read %zd: %s)\n", n, strerror(errno));
  }
  int st;
  waitpid(reader, &st, 0);
  checks++;
  if (WIFEXITED(st) && !WEXITSTATUS(st)) printf("ok reader served after the fault\n");
  else failed++, printf("FAIL reader: status %d\n", st);

  credit_room(ctl);
  evict_preparing(ctl);

  // the daemon's fd closes (a ROOM it read unanswered): a new fd takes the device, and a third is
  // refused while it holds it. ATTACH lifts the limit and ends that ROOM with no grant (K4): the
  // write goes on, and the new daemon never reads it.
  struct uloop_credit c0 = {.flags = ULOOP_CREDIT_F_LIMIT, .limit = 0};
  expect("room at attach: limit 0", ioctl(ctl, ULOOP_IOC_CREDIT, &c0), 0);
  pid_t rw = write_block(7);
  checks++;
  if (read_msg(ctl, m, 10000) && m[0].type == ULOOP_MSG_ROOM && m[0].offset == 7 * 65536) printf("ok room at attach: the dying daemon read a ROOM\n");
  else failed++, printf("FAIL room at attach: no ROOM for block 7 (type %u)\n", m[0].type);
  close(ctl);
  ctl = ctl_open();
  fcntl(ctl, F_SETFL, O_NONBLOCK);
  struct uloop_attach re = {.version = ULOOP_ABI_VERSION, .index = 5};
  expect("attach: after the daemon closed its fd", ioctl(ctl, ULOOP_IOC_ATTACH, &re), 0);
  expect_exit("room at attach: the write went on under no limit", rw, 0);
  checks++;
  if (!read_msg(ctl, m, 300)) printf("ok room at attach: the new daemon reads no ROOM\n");
  else failed++, printf("FAIL room at attach: the new daemon read type %u (offset %llu)\n", m[0].type, (unsigned long long)m[0].offset);
  int ctl3 = ctl_open();
  expect("attach: the re-attached daemon holds it", ioctl(ctl3, ULOOP_IOC_ATTACH, &re), EBUSY);
  close(ctl3);
  struct uloop_info q5 = {.index = 5};
  checks++;
  if (ioctl(ctl2, ULOOP_IOC_QUERY, &q5) == 0 && q5.attached == 1) printf("ok query: attached after re-attach\n");
  else failed++, printf("FAIL query after re-attach: attached=%u (%s)\n", q5.attached, strerror(errno));
  checks++;
  if (q5.credit_limit == ULOOP_CREDIT_NONE) printf("ok credit: ATTACH lifts the limit\n");
  else failed++, printf("FAIL credit after re-attach: limit=%llu\n", (unsigned long long)q5.credit_limit);
  idx = 5;
  expect("remove: while the daemon is attached and the device closed", ioctl(ctl2, ULOOP_IOC_REMOVE, &idx), 0);
  expect("attach: device removed", ioctl(ctl3 = ctl_open(), ULOOP_IOC_ATTACH, &re), ENODEV);
  close(ctl3);
  expect("query: removed", ioctl(ctl2, ULOOP_IOC_QUERY, &q), ENODEV);
  expect("claim: device removed", ioctl(ctl, ULOOP_IOC_CLAIM, &r), ENODEV);
  expect("read: device removed", read(ctl, m, sizeof(m)), ENODEV);
  close(ctl);
  close(ctl2);
  close(cache);
  close(ro);
  close(wo);
  close(dir);
}

// ---- races ---------------------------------------------------------------------------------------

static volatile int stop;
static long counts[5][140];
static const char *role_names[] = {"add", "remove", "attach", "query", "open"};
static int allowed[5][8] = {
    {0, EEXIST},                  // add (index 7)
    {0, ENODEV, EBUSY},           // remove
    {0, ENODEV, EBUSY},           // attach
    {0, ENODEV},                  // query
    {0, ENOENT, ENXIO, ENODEV},   // open /dev/uloop7 (node gone, deleting, or being torn down)
};

static void *racer(void *arg) {
  int role = (int)(intptr_t)arg, cache = open(cache_path, O_RDWR);
  char buf[4096];
  while (!stop) {
    int ctl = ctl_open(), err = 0;
    long ret;
    if (role == 0) {
      struct uloop_add a = good_add(cache, 7);
      ret = ioctl(ctl, ULOOP_IOC_ADD, &a);
    } else if (role == 1) {
      uint32_t i = 7;
      ret = ioctl(ctl, ULOOP_IOC_REMOVE, &i);
    } else if (role == 2) {
      struct uloop_attach at = {.version = ULOOP_ABI_VERSION, .index = 7};
      ret = ioctl(ctl, ULOOP_IOC_ATTACH, &at);
    } else if (role == 3) {
      struct uloop_info q = {.index = 7};
      ret = ioctl(ctl, ULOOP_IOC_QUERY, &q);
    } else {
      int d = open("/dev/uloop7", O_RDONLY);
      ret = d;
      if (d >= 0) {
        if (pread(d, buf, sizeof(buf), 4096) < 0) counts[4][139]++; // an I/O error: counted apart
        close(d);
      }
    }
    err = ret < 0 ? errno : 0;
    counts[role][err < 139 ? err : 138]++;
    close(ctl);
  }
  close(cache);
  return 0;
}

static void races(int seconds) {
  pthread_t t[5];
  for (int i = 0; i < 5; i++) pthread_create(&t[i], 0, racer, (void *)(intptr_t)i);
  sleep(seconds);
  stop = 1;
  for (int i = 0; i < 5; i++) pthread_join(t[i], 0);
  for (int r = 0; r < 5; r++) {
    char line[512];
    int len = snprintf(line, sizeof(line), "race %s:", role_names[r]);
    int bad = 0;
    for (int e = 0; e < 139; e++) {
      if (!counts[r][e]) continue;
      len += snprintf(line + len, sizeof(line) - len, " %s=%ld", e ? strerrorname_np(e) : "ok", counts[r][e]);
      int ok = 0;
      for (int k = 0; k < 8 && (k == 0 || allowed[r][k]); k++) ok |= allowed[r][k] == e;
      bad |= !ok;
    }
    if (counts[r][139]) len += snprintf(line + len, sizeof(line) - len, " io_errors=%ld", counts[r][139]);
    checks++;
    if (bad) failed++, printf("FAIL %s\n", line);
    else printf("ok %s\n", line);
  }
  int ctl = ctl_open();
  uint32_t i = 7;
  for (int k = 0; k < 100 && ioctl(ctl, ULOOP_IOC_REMOVE, &i) && errno == EBUSY; k++) usleep(100000);
  struct uloop_info q = {.index = 7};
  expect("race: device 7 gone at the end", ioctl(ctl, ULOOP_IOC_QUERY, &q), ENODEV);
  close(ctl);
}

int main(int argc, char **argv) {
  if (argc != 3) return fprintf(stderr, "usage: uloop-abuse CACHE_FILE RACE_SECONDS\n"), 2;
  cache_path = argv[1];
  setvbuf(stdout, 0, _IOLBF, 0);
  memset(ones, 0xff, sizeof(ones));
  int ctl = ctl_open();
  struct uloop_features f;
  expect("get features", ioctl(ctl, ULOOP_IOC_GET_FEATURES, &f), 0);
  printf("features version=%u features=%#llx max_part=%u max_devices=%u\n", f.version, (unsigned long long)f.features,
         f.max_part, f.max_devices);
  close(ctl);
  add_refusals();
  races(atoi(argv[2]));
  printf("abuse: %d checks, %d failed\n", checks, failed);
  return failed != 0;
}
