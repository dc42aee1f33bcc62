// uloopctl: a C client of /dev/uloop-control for the VM tests, independent of the Node daemon, so
// the module's protocol is tested on its own (kernel/include/uapi/uloop.h).
//
//   uloopctl features
//   uloopctl add CACHE SIZE BLOCK_SIZE ro|wb none|all|dirty [--flags preserve,zero,accessed,partscan]
//            [--lbs N] [--pbs N] [--unit-shift N] [--index N]
//                                  prints N and exits: the device stays, detached
//   uloopctl remove N | query N     query prints key=value pairs on one line
//   uloopctl serve N SOURCE CACHE [DELAY_MS] [options]
//       The daemon: attaches to /dev/uloopN and answers its upcalls, one log line each: MISS from
//       SOURCE (zeros for blocks it recorded zero), INTENT, BARRIER (fetches the bits), PRESERVE
//       (keeps the block's current content in memory for the epoch), ZERO (records the blocks and
//       punches the cache file). Options:
//         --backing FILE        where the flusher writes (default SOURCE)
//         --ctl FIFO            reads commands, one per line (below)
//         --fail-miss-from OFF  answers misses at or past byte OFF with -EIO
//         --hold TYPE           never answers messages of TYPE (miss, intent, barrier, ...)
//                               until `answer-held ERR` (ERR 0: does the work, e.g. fills, first)
//         --barrier-cmd CMD     runs CMD (sh -c, with $BARRIER = the barrier's number) first
//         --barrier-dump DIR    writes each barrier's bitmap to DIR/barrier.N
//         --flush-delay-ms N    the flusher sleeps N ms after each block it copies
//         --release             the flusher EPOCH_RELEASEs each block once it has read it
//         --check-durable       at each BARRIER, counts the reported blocks whose cache-file
//                               pages are still dirty or under writeback (/proc/kpageflags): the
//                               kernel synced the file before the barrier, so there must be none
//       Commands: flush (one whole epoch: BEGIN, sync, copy the snapshot to the backing file,
//       sync, COMMIT), hydrate FIRST COUNT (CLAIM, fill from SOURCE, FILLED), hydrate-blind FIRST
//       COUNT (copies SOURCE into the cache file without asking the kernel: the hydration bug
//       CLAIM exists to prevent), evict FIRST COUNT,
//       accessed FIRST COUNT, clear-error, answer-held ERR, reply ID ERR, quit.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../../kernel/include/uapi/uloop.h"

static int die(const char *what) {
  fprintf(stderr, "uloopctl: %s: %s\n", what, strerror(errno));
  return 1;
}

static const char *msg_name(uint32_t t) {
  static const char *n[] = {"?", "miss", "intent", "barrier", "preserve", "zero"};
  return t < sizeof(n) / sizeof(n[0]) ? n[t] : "?";
}

static int bit(const uint8_t *b, uint64_t i) { return b[i / 8] >> (i % 8) & 1; }
static void setbit(uint8_t *b, uint64_t i, int v) {
  if (v) b[i / 8] |= 1 << (i % 8);
  else b[i / 8] &= ~(1 << (i % 8));
}
static uint64_t popcount(const uint8_t *b, uint64_t bytes) {
  uint64_t n = 0;
  for (uint64_t i = 0; i < bytes; i++) n += __builtin_popcount(b[i]);
  return n;
}

static int cmd_add(int ctl, int argc, char **argv) {
  int wb = !strcmp(argv[5], "wb");
  int fd = open(argv[2], wb ? O_RDWR : O_RDONLY);
  if (fd < 0) return die("open cache");
  struct uloop_add a = {.version = ULOOP_ABI_VERSION, .cache_fd = fd, .index = ULOOP_INDEX_ANY};
  a.size = strtoull(argv[3], 0, 0);
  a.block_size = strtoul(argv[4], 0, 0);
  a.flags = wb ? ULOOP_F_WRITEBACK : 0;
  for (int i = 7; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--flags")) {
      if (strstr(argv[i + 1], "preserve")) a.flags |= ULOOP_F_PRESERVE;
      if (strstr(argv[i + 1], "zero")) a.flags |= ULOOP_F_ZERO;
      if (strstr(argv[i + 1], "accessed")) a.flags |= ULOOP_F_ACCESSED;
      if (strstr(argv[i + 1], "partscan")) a.flags |= ULOOP_F_PARTSCAN;
    } else if (!strcmp(argv[i], "--lbs")) a.logical_block_size = strtoul(argv[i + 1], 0, 0);
    else if (!strcmp(argv[i], "--pbs")) a.physical_block_size = strtoul(argv[i + 1], 0, 0);
    else if (!strcmp(argv[i], "--unit-shift")) a.unit_shift = strtoul(argv[i + 1], 0, 0);
    else if (!strcmp(argv[i], "--index")) a.index = strtoul(argv[i + 1], 0, 0);
    else return fprintf(stderr, "uloopctl: unknown option %s\n", argv[i]), 2;
  }
  uint64_t nb = a.block_size ? (a.size + a.block_size - 1) / a.block_size : 0, bytes = (nb + 7) / 8;
  uint8_t *p = calloc(1, bytes + 8), *d = calloc(1, bytes + 8);
  if (!p || !d) return die("calloc");
  if (strcmp(argv[6], "none")) memset(p, 0xff, bytes);
  if (!strcmp(argv[6], "dirty")) memset(d, 0xff, bytes);
  a.present_ptr = (uintptr_t)p;
  a.dirty_ptr = (uintptr_t)d;
  a.bitmap_length = bytes;
  if (ioctl(ctl, ULOOP_IOC_ADD, &a)) return die("ULOOP_IOC_ADD");
  printf("%u\n", a.index);
  return 0;
}

static int print_query(int ctl, uint32_t index, FILE *out) {
  struct uloop_info q = {.index = index};
  if (ioctl(ctl, ULOOP_IOC_QUERY, &q)) return die("ULOOP_IOC_QUERY");
  fprintf(out,
          "size=%llu block_size=%u blocks=%llu present=%llu dirty=%llu epoch=%llu attached=%u waiting=%u "
          "error=%d state=%u zero=%llu pending=%llu claimed=%llu read_hits=%llu read_misses=%llu "
          "write_hits=%llu write_upcalls=%llu read_bytes=%llu write_bytes=%llu zero_bytes=%llu "
          "flushes=%llu barriers=%llu timeouts=%llu io_errors=%llu late_replies=%llu mem=%llu "
          "inflight=%u lbs=%u pbs=%u unit_shift=%u\n",
          (unsigned long long)q.size, q.block_size, (unsigned long long)q.nr_blocks,
          (unsigned long long)q.present_blocks, (unsigned long long)q.dirty_blocks, (unsigned long long)q.epoch,
          q.attached, q.waiting, q.error, q.state, (unsigned long long)q.zero_blocks,
          (unsigned long long)q.pending_blocks, (unsigned long long)q.claimed_blocks,
          (unsigned long long)q.read_hits, (unsigned long long)q.read_misses, (unsigned long long)q.write_hits,
          (unsigned long long)q.write_upcalls, (unsigned long long)q.read_bytes,
          (unsigned long long)q.write_bytes, (unsigned long long)q.zero_bytes, (unsigned long long)q.flushes,
          (unsigned long long)q.barriers, (unsigned long long)q.timeouts, (unsigned long long)q.io_errors,
          (unsigned long long)q.late_replies, (unsigned long long)q.mem_bytes, q.inflight,
          q.logical_block_size, q.physical_block_size, q.unit_shift);
  fflush(out);
  return 0;
}

// ---- serve --------------------------------------------------------------------------------------

struct held { struct uloop_msg msg; struct held *next; };

static struct {
  int ctl, src, cache, backing, fifo;
  uint32_t index, bs;
  uint64_t size, nblocks, bytes;
  int delay_ms, flush_delay_ms, release;
  uint64_t fail_miss_from;
  uint32_t hold_type;
  const char *barrier_cmd, *barrier_dump;
  uint64_t barriers;
  uint8_t *zero;           // blocks recorded zero (ULOOP_MSG_ZERO), NULL until the first
  uint8_t *bar_p, *bar_d;  // barrier buffers
  // the flush epoch in progress
  uint64_t epoch;
  uint8_t **preserved;     // per block of the snapshot: its epoch content, or NULL
  uint64_t npreserved;
  struct held *held;
  char *buf;
  int check_durable, pagemap, kpageflags;
  volatile uint8_t *map;   // the cache file, mapped for --check-durable
} S;

// 1 if the cache file's page at `off` is dirty or under writeback, 0 if clean, -1 if unknown.
static int page_unsynced(uint64_t off) {
  uint64_t ent, flags;
  (void)S.map[off];  // fault the page cache page into our page tables (reading changes nothing)
  uint64_t vpage = ((uintptr_t)S.map + off) / 4096;
  if (pread(S.pagemap, &ent, 8, vpage * 8) != 8 || !(ent >> 63)) return -1;
  if (pread(S.kpageflags, &flags, 8, (ent & ((1ULL << 55) - 1)) * 8) != 8) return -1;
  return (flags >> 4 & 1) || (flags >> 8 & 1);  // KPF_DIRTY, KPF_WRITEBACK
}

static void sleep_ms(int ms) {
  struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
  nanosleep(&t, 0);
}

static int copy_block(int from, int to, uint64_t off, uint64_t len) {
  for (uint64_t done = 0; done < len;) {
    size_t n = len - done > (1 << 20) ? (1 << 20) : len - done;
    ssize_t k = pread(from, S.buf, n, off + done);
    if (k <= 0 || pwrite(to, S.buf, k, off + done) != k) return -EIO;
    done += k;
  }
  return 0;
}

static int zero_range(int to, uint64_t off, uint64_t len) {
  memset(S.buf, 0, 1 << 20);
  for (uint64_t done = 0; done < len;) {
    size_t n = len - done > (1 << 20) ? (1 << 20) : len - done;
    if (pwrite(to, S.buf, n, off + done) != (ssize_t)n) return -EIO;
    done += n;
  }
  return 0;
}

static int is_zero(uint64_t b) { return S.zero && bit(S.zero, b); }

static int handle(const struct uloop_msg *m) {
  uint64_t b0 = m->offset / S.bs, b1 = (m->offset + m->length + S.bs - 1) / S.bs;
  int err = 0;
  if (S.delay_ms) sleep_ms(S.delay_ms);
  switch (m->type) {
  case ULOOP_MSG_MISS:
    for (uint64_t b = b0; b < b1 && !err; b++) {
      uint64_t off = b * S.bs, len = off + S.bs > S.size ? S.size - off : S.bs;
      if (off >= S.fail_miss_from) err = -EIO;
      else err = is_zero(b) ? zero_range(S.cache, off, len) : copy_block(S.src, S.cache, off, len);
    }
    printf("miss %llu+%llu%s\n", (unsigned long long)m->offset, (unsigned long long)m->length, err ? " failed" : "");
    break;
  case ULOOP_MSG_INTENT:
    printf("intent %llu+%llu\n", (unsigned long long)m->offset, (unsigned long long)m->length);
    break;
  case ULOOP_MSG_BARRIER: {
    struct uloop_barrier_bits bb = {.id = m->id, .present_ptr = (uintptr_t)S.bar_p, .dirty_ptr = (uintptr_t)S.bar_d, .length = m->length};
    if (ioctl(S.ctl, ULOOP_IOC_BARRIER_BITS, &bb)) {
      err = -errno;
      printf("barrier bits failed: %s\n", strerror(errno));
      break;
    }
    uint64_t n = ++S.barriers;
    if (S.zero)
      for (uint64_t i = 0; i < S.bytes; i++) S.zero[i] &= ~S.bar_p[i];
    if (S.barrier_dump) {
      char path[4096];
      snprintf(path, sizeof(path), "%s/barrier.%llu", S.barrier_dump, (unsigned long long)n);
      int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (fd < 0 || write(fd, S.bar_p, S.bytes) != (ssize_t)S.bytes) err = -EIO;
      if (fd >= 0) close(fd);
    }
    if (S.barrier_cmd) {
      char env[64];
      snprintf(env, sizeof(env), "%llu", (unsigned long long)n);
      setenv("BARRIER", env, 1);
      if (system(S.barrier_cmd)) err = -EIO;
    }
    if (S.check_durable) {
      uint64_t unsynced = 0, unknown = 0;
      for (uint64_t b = 0; b < S.nblocks; b++) {
        if (!bit(S.bar_p, b)) continue;
        for (uint64_t off = b * S.bs; off < (b + 1) * S.bs && off < S.size; off += 4096) {
          int u = page_unsynced(off);
          if (u < 0) unknown++;
          else if (u) { unsynced++; break; }
        }
      }
      printf("barrier %llu durable-check unsynced=%llu unknown=%llu\n", (unsigned long long)n,
             (unsigned long long)unsynced, (unsigned long long)unknown);
    }
    printf("barrier present=%llu dirty=%llu\n", (unsigned long long)popcount(S.bar_p, S.bytes),
           (unsigned long long)popcount(S.bar_d, S.bytes));
    break;
  }
  case ULOOP_MSG_PRESERVE:
    for (uint64_t b = b0; b < b1 && S.preserved && m->epoch == S.epoch; b++) {
      if (S.preserved[b]) continue;
      uint8_t *copy = malloc(S.bs);
      if (!copy || pread(S.cache, copy, S.bs, b * S.bs) < 0) return -ENOMEM;
      S.preserved[b] = copy;
      S.npreserved++;
    }
    printf("preserve %llu+%llu epoch %llu\n", (unsigned long long)m->offset, (unsigned long long)m->length,
           (unsigned long long)m->epoch);
    break;
  case ULOOP_MSG_ZERO:
    if (!S.zero) S.zero = calloc(1, S.bytes + 8);
    for (uint64_t b = b0; b < b1; b++) setbit(S.zero, b, 1);
    if (!(m->flags & ULOOP_MSG_F_NOUNMAP) &&
        fallocate(S.cache, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, m->offset, m->length))
      err = -errno;
    printf("zero %llu+%llu%s%s\n", (unsigned long long)m->offset, (unsigned long long)m->length,
           m->flags & ULOOP_MSG_F_DISCARD ? " discard" : "", m->flags & ULOOP_MSG_F_NOUNMAP ? " nounmap" : "");
    break;
  default:
    printf("unknown message type %u\n", m->type);
    err = -EINVAL;
  }
  return err;
}

static int reply(uint64_t id, int32_t error) {
  struct uloop_reply r = {.id = id, .error = error};
  return write(S.ctl, &r, sizeof(r)) == sizeof(r) ? 0 : -errno;
}

// Reads and answers whatever the kernel has queued; returns -1 on a fatal error.
static int pump(int timeout_ms) {
  struct pollfd pfd = {.fd = S.ctl, .events = POLLIN};
  int r = poll(&pfd, 1, timeout_ms);
  if (r < 0) return errno == EINTR ? 0 : -1;
  if (!r) return 0;
  if (pfd.revents & POLLHUP) return printf("device removed\n"), -1;
  struct uloop_msg m[16];
  ssize_t n = read(S.ctl, m, sizeof(m));
  if (n < 0) return errno == EAGAIN ? 0 : (printf("read: %s\n", strerror(errno)), -1);
  for (int i = 0; i < n / (ssize_t)sizeof(m[0]); i++) {
    if (m[i].type == S.hold_type) {
      struct held *h = malloc(sizeof(*h));
      h->msg = m[i];
      h->next = S.held;
      S.held = h;
      printf("holding %s %llu\n", msg_name(m[i].type), (unsigned long long)m[i].id);
      continue;
    }
    int err = handle(&m[i]);
    if ((err = reply(m[i].id, err))) printf("reply %llu: %s\n", (unsigned long long)m[i].id, strerror(-err));
  }
  fflush(stdout);
  return 0;
}

static void flush_epoch(void) {
  uint8_t *snap = calloc(1, S.bytes + 8);
  struct uloop_epoch e = {.dirty_ptr = (uintptr_t)snap, .length = S.bytes};
  if (ioctl(S.ctl, ULOOP_IOC_EPOCH_BEGIN, &e)) {
    printf("begin failed: %s\n", strerror(errno));
    free(snap);
    return;
  }
  S.epoch = e.epoch;
  S.preserved = calloc(S.nblocks, sizeof(*S.preserved));
  S.npreserved = 0;
  uint64_t nsnap = popcount(snap, S.bytes);
  printf("begun %llu snapshot=%llu\n", (unsigned long long)e.epoch, (unsigned long long)nsnap);
  fflush(stdout);
  fsync(S.cache);
  for (uint64_t b = 0; b < S.nblocks; b++) {
    if (!bit(snap, b)) continue;
    if (pump(0) < 0) break;
    uint64_t off = b * S.bs, len = off + S.bs > S.size ? S.size - off : S.bs;
    int err;
    if (S.preserved[b]) err = pwrite(S.backing, S.preserved[b], len, off) == (ssize_t)len ? 0 : -EIO;
    else if (is_zero(b)) err = zero_range(S.backing, off, len);
    else err = copy_block(S.cache, S.backing, off, len);
    if (err) printf("flusher: block %llu failed\n", (unsigned long long)b);
    if (S.release) {
      struct uloop_blocks r = {.first = b, .count = 1, .id = S.epoch};
      if (ioctl(S.ctl, ULOOP_IOC_EPOCH_RELEASE, &r)) printf("release failed: %s\n", strerror(errno));
    }
    if (S.flush_delay_ms) sleep_ms(S.flush_delay_ms);
  }
  fsync(S.backing);
  e.dirty_ptr = (uintptr_t)snap;
  if (ioctl(S.ctl, ULOOP_IOC_EPOCH_COMMIT, &e)) printf("commit failed: %s\n", strerror(errno));
  else
    printf("committed %llu cleared=%llu preserved=%llu\n", (unsigned long long)e.epoch,
           (unsigned long long)e.cleared, (unsigned long long)S.npreserved);
  for (uint64_t b = 0; b < S.nblocks; b++) free(S.preserved[b]);
  free(S.preserved);
  S.preserved = 0;
  S.epoch = 0;
  free(snap);
}

static void range_cmd(const char *cmd, uint64_t first, uint64_t count) {
  uint8_t *bits = calloc(1, count / 8 + 16);
  struct uloop_blocks a = {.first = first, .count = count, .bits_ptr = (uintptr_t)bits};
  if (!strcmp(cmd, "hydrate")) {
    if (ioctl(S.ctl, ULOOP_IOC_CLAIM, &a)) {
      printf("claim failed: %s\n", strerror(errno));
    } else {
      uint64_t claimed = a.done;
      for (uint64_t i = 0; i < count; i++)  // fill what was claimed, answering upcalls meanwhile
        if (bit(bits, i)) {
          if (pump(0) < 0) break;
          uint64_t off = (first + i) * S.bs, len = off + S.bs > S.size ? S.size - off : S.bs;
          if (copy_block(S.src, S.cache, off, len)) setbit(bits, i, 0);
          if (S.flush_delay_ms) sleep_ms(S.flush_delay_ms);
        }
      if (ioctl(S.ctl, ULOOP_IOC_FILLED, &a)) printf("filled failed: %s\n", strerror(errno));
      else printf("hydrated claimed=%llu filled=%llu\n", (unsigned long long)claimed, (unsigned long long)a.done);
    }
  } else if (!strcmp(cmd, "hydrate-blind")) {
    for (uint64_t i = 0; i < count; i++) {
      uint64_t off = (first + i) * S.bs, len = off + S.bs > S.size ? S.size - off : S.bs;
      copy_block(S.src, S.cache, off, len);
    }
    printf("hydrated blindly %llu\n", (unsigned long long)count);
  } else if (!strcmp(cmd, "evict")) {
    memset(bits, 0xff, count / 8 + 1);
    if (ioctl(S.ctl, ULOOP_IOC_EVICT, &a)) {
      printf("evict failed: %s\n", strerror(errno));
    } else {
      for (uint64_t i = 0; i < count; i++)
        if (bit(bits, i) && fallocate(S.cache, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (first + i) * S.bs, S.bs))
          printf("punch failed: %s\n", strerror(errno));
      printf("evicted %llu\n", (unsigned long long)a.done);
    }
  } else if (!strcmp(cmd, "accessed")) {
    if (ioctl(S.ctl, ULOOP_IOC_ACCESSED, &a)) {
      printf("accessed failed: %s\n", strerror(errno));
    } else {
      printf("accessed %llu:", (unsigned long long)a.done);
      for (uint64_t i = 0; i < count; i++)
        if (bit(bits, i)) printf(" %llu", (unsigned long long)(first + i));
      printf("\n");
    }
  }
  free(bits);
}

static int command(char *line) {
  char cmd[32] = "";
  unsigned long long x = 0, y = 0;
  long long err = 0;
  sscanf(line, "%31s %llu %llu", cmd, &x, &y);
  if (!strcmp(cmd, "quit")) return -1;
  if (!strcmp(cmd, "flush")) flush_epoch();
  else if (!strcmp(cmd, "hydrate") || !strcmp(cmd, "hydrate-blind") || !strcmp(cmd, "evict") || !strcmp(cmd, "accessed"))
    range_cmd(cmd, x, y);
  else if (!strcmp(cmd, "clear-error")) {
    uint8_t *dropped = calloc(1, S.bytes + 8);
    struct uloop_clear_error c = {.dropped_ptr = (uintptr_t)dropped, .length = S.bytes};
    if (ioctl(S.ctl, ULOOP_IOC_CLEAR_ERROR, &c)) printf("clear-error failed: %s\n", strerror(errno));
    else printf("cleared error=%d dropped=%llu bits=%llu\n", c.error, (unsigned long long)c.dropped,
                (unsigned long long)popcount(dropped, S.bytes));
    free(dropped);
  } else if (!strcmp(cmd, "answer-held")) {
    sscanf(line, "%*s %lld", &err);
    while (S.held) {
      struct held *h = S.held;
      // answering 0 does the work first (a MISS fills the cache file): a late daemon, not a liar
      int r = reply(h->msg.id, err ? (int32_t)err : handle(&h->msg));
      printf("answered held %llu: %s\n", (unsigned long long)h->msg.id, r ? strerror(-r) : "ok");
      S.held = h->next;
      free(h);
    }
  } else if (!strcmp(cmd, "reply")) {
    sscanf(line, "%*s %llu %lld", &x, &err);
    int r = reply(x, (int32_t)err);
    printf("reply %llu: %s\n", x, r ? strerror(-r) : "ok");
  } else if (!strcmp(cmd, "query")) {
    print_query(S.ctl, S.index, stdout);
  } else if (cmd[0]) {
    printf("unknown command %s\n", cmd);
  }
  fflush(stdout);
  return 0;
}

static int cmd_serve(int ctl, int argc, char **argv) {
  S.ctl = ctl;
  S.index = strtoul(argv[2], 0, 0);
  S.fail_miss_from = UINT64_MAX;
  S.fifo = -1;
  const char *backing = argv[3], *fifo = 0;
  int i = 5;
  if (argc > 5 && argv[5][0] != '-') S.delay_ms = atoi(argv[i++]);
  for (; i < argc; i++) {
    const char *v = i + 1 < argc ? argv[i + 1] : "";
    if (!strcmp(argv[i], "--release")) { S.release = 1; continue; }
    if (!strcmp(argv[i], "--check-durable")) { S.check_durable = 1; continue; }
    if (i + 1 >= argc) return fprintf(stderr, "uloopctl: %s needs a value\n", argv[i]), 2;
    i++;
    if (!strcmp(argv[i - 1], "--backing")) backing = v;
    else if (!strcmp(argv[i - 1], "--ctl")) fifo = v;
    else if (!strcmp(argv[i - 1], "--fail-miss-from")) S.fail_miss_from = strtoull(v, 0, 0);
    else if (!strcmp(argv[i - 1], "--hold")) {
      for (uint32_t t = 1; t <= ULOOP_MSG_ZERO; t++)
        if (!strcmp(msg_name(t), v)) S.hold_type = t;
    } else if (!strcmp(argv[i - 1], "--barrier-cmd")) S.barrier_cmd = v;
    else if (!strcmp(argv[i - 1], "--barrier-dump")) S.barrier_dump = v;
    else if (!strcmp(argv[i - 1], "--flush-delay-ms")) S.flush_delay_ms = atoi(v);
    else return fprintf(stderr, "uloopctl: unknown option %s\n", argv[i - 1]), 2;
  }
  struct uloop_attach at = {.version = ULOOP_ABI_VERSION, .index = S.index};
  if (ioctl(ctl, ULOOP_IOC_ATTACH, &at)) return die("ULOOP_IOC_ATTACH");
  struct uloop_info q = {.index = S.index};
  if (ioctl(ctl, ULOOP_IOC_QUERY, &q)) return die("ULOOP_IOC_QUERY");
  S.bs = q.block_size;
  S.size = q.size;
  S.nblocks = q.nr_blocks;
  S.bytes = (S.nblocks + 7) / 8;
  S.src = open(argv[3], O_RDONLY);
  S.cache = open(argv[4], O_RDWR);
  S.backing = open(backing, O_RDWR);
  if (S.src < 0 || S.cache < 0 || S.backing < 0) return die("open source/cache/backing");
  if (fifo && (S.fifo = open(fifo, O_RDWR | O_NONBLOCK)) < 0) return die("open ctl fifo");
  if (S.check_durable) {
    S.map = mmap(0, S.size, PROT_READ, MAP_SHARED, S.cache, 0);
    S.pagemap = open("/proc/self/pagemap", O_RDONLY);
    S.kpageflags = open("/proc/kpageflags", O_RDONLY);
    if (S.map == MAP_FAILED || S.pagemap < 0 || S.kpageflags < 0) return die("--check-durable setup");
  }
  S.buf = malloc(1 << 20);
  S.bar_p = malloc(S.bytes + 8);
  S.bar_d = malloc(S.bytes + 8);
  if (!S.buf || !S.bar_p || !S.bar_d) return die("malloc");
  setvbuf(stdout, 0, _IOLBF, 0);
  signal(SIGPIPE, SIG_IGN);
  printf("attached %u\n", at.index);
  char line[256];
  size_t have = 0;
  for (;;) {
    struct pollfd pfd[2] = {{.fd = ctl, .events = POLLIN}, {.fd = S.fifo, .events = POLLIN}};
    if (poll(pfd, S.fifo >= 0 ? 2 : 1, -1) < 0 && errno != EINTR) return die("poll");
    if (pfd[0].revents && pump(0) < 0) return 0;
    if (S.fifo >= 0 && (pfd[1].revents & POLLIN)) {
      ssize_t n = read(S.fifo, line + have, sizeof(line) - 1 - have);
      if (n > 0) have += n;
      char *nl;
      while ((nl = memchr(line, '\n', have))) {
        *nl = 0;
        if (command(line) < 0) return 0;
        have -= nl + 1 - line;
        memmove(line, nl + 1, have);
      }
      if (have == sizeof(line) - 1) have = 0;
    }
  }
}

int main(int argc, char **argv) {
  if (argc < 2) return fprintf(stderr, "usage: see the top of test/vm/uloopctl.c\n"), 2;
  int ctl = open("/dev/" ULOOP_CONTROL_NAME, O_RDWR | O_CLOEXEC);
  if (ctl < 0) return die("open /dev/uloop-control");
  if (!strcmp(argv[1], "features")) {
    struct uloop_features f;
    if (ioctl(ctl, ULOOP_IOC_GET_FEATURES, &f)) return die("ULOOP_IOC_GET_FEATURES");
    printf("version=%u features=%#llx max_part=%u max_devices=%u io_timeout_s=%u max_blocks=%llu\n", f.version,
           (unsigned long long)f.features, f.max_part, f.max_devices, f.io_timeout_s,
           (unsigned long long)f.max_blocks);
    return 0;
  }
  if (!strcmp(argv[1], "add") && argc >= 7) return cmd_add(ctl, argc, argv);
  if (!strcmp(argv[1], "remove") && argc == 3) {
    uint32_t i = strtoul(argv[2], 0, 0);
    if (ioctl(ctl, ULOOP_IOC_REMOVE, &i)) return die("ULOOP_IOC_REMOVE");
    return 0;
  }
  if (!strcmp(argv[1], "query") && argc == 3) return print_query(ctl, strtoul(argv[2], 0, 0), stdout);
  if (!strcmp(argv[1], "serve") && argc >= 5) return cmd_serve(ctl, argc, argv);
  return fprintf(stderr, "uloopctl: bad command (see the top of test/vm/uloopctl.c)\n"), 2;
}
