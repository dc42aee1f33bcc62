// uloopctl: a minimal C client of /dev/uloop-control for the VM tests, independent of the Node
// daemon, so the module's protocol is tested on its own.
//   uloopctl add CACHE SIZE BLOCK_SIZE ro|wb none|all|dirty -> prints N, exits (device stays, detached)
//   uloopctl remove N | query N
//   uloopctl serve N SOURCE CACHE [delay_ms]   answers misses from SOURCE, intents and barriers
//                                             with 0; logs one line per message; runs until killed
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "../../kernel/include/uapi/uloop.h"

static int die(const char *what) {
  fprintf(stderr, "uloopctl: %s: %s\n", what, strerror(errno));
  return 1;
}

int main(int argc, char **argv) {
  if (argc < 3) return fprintf(stderr, "usage: see source\n"), 2;
  int ctl = open("/dev/uloop-control", O_RDWR | O_CLOEXEC);
  if (ctl < 0) return die("open /dev/uloop-control");
  if (!strcmp(argv[1], "add") && argc == 7) {
    int fd = open(argv[2], strcmp(argv[5], "wb") ? O_RDONLY : O_RDWR);
    if (fd < 0) return die("open cache");
    struct uloop_add a = {.version = ULOOP_ABI_VERSION, .cache_fd = fd, .index = ULOOP_INDEX_ANY};
    a.size = strtoull(argv[3], 0, 0);
    a.block_size = strtoul(argv[4], 0, 0);
    a.flags = strcmp(argv[5], "wb") ? 0 : ULOOP_F_WRITEBACK;
    uint64_t nb = (a.size + a.block_size - 1) / a.block_size;
    uint8_t *p = calloc(1, nb / 8 + 8), *d = calloc(1, nb / 8 + 8);
    if (strcmp(argv[6], "none")) memset(p, 0xff, nb / 8 + 1);
    if (!strcmp(argv[6], "dirty")) memset(d, 0xff, nb / 8 + 1);
    a.present_ptr = (uintptr_t)p;
    a.dirty_ptr = (uintptr_t)d;
    if (ioctl(ctl, ULOOP_IOC_ADD, &a)) return die("ULOOP_IOC_ADD");
    printf("%u\n", a.index);
    return 0;
  }
  if (!strcmp(argv[1], "remove")) {
    uint32_t i = strtoul(argv[2], 0, 0);
    if (ioctl(ctl, ULOOP_IOC_REMOVE, &i)) return die("ULOOP_IOC_REMOVE");
    return 0;
  }
  if (!strcmp(argv[1], "query")) {
    struct uloop_info q = {.index = strtoul(argv[2], 0, 0)};
    if (ioctl(ctl, ULOOP_IOC_QUERY, &q)) return die("ULOOP_IOC_QUERY");
    printf("size=%llu block_size=%u blocks=%llu present=%llu dirty=%llu epoch=%llu attached=%u waiting=%u\n",
           (unsigned long long)q.size, q.block_size, (unsigned long long)q.nr_blocks, (unsigned long long)q.present_blocks,
           (unsigned long long)q.dirty_blocks, (unsigned long long)q.epoch, q.attached, q.waiting);
    return 0;
  }
  if (!strcmp(argv[1], "serve") && argc >= 5) {
    struct uloop_attach at = {.version = ULOOP_ABI_VERSION, .index = strtoul(argv[2], 0, 0)};
    if (ioctl(ctl, ULOOP_IOC_ATTACH, &at)) return die("ULOOP_IOC_ATTACH");
    int src = open(argv[3], O_RDONLY), cache = open(argv[4], O_RDWR);
    if (src < 0 || cache < 0) return die("open source/cache");
    int delay = argc > 5 ? atoi(argv[5]) : 0;
    static char buf[1 << 20];
    setvbuf(stdout, 0, _IOLBF, 0);
    printf("attached %u\n", at.index);
    for (;;) {
      struct pollfd pfd = {.fd = ctl, .events = POLLIN};
      if (poll(&pfd, 1, -1) < 0) return die("poll");
      struct uloop_msg m[16];
      ssize_t n = read(ctl, m, sizeof(m));
      if (n < 0) return die("read");
      for (int i = 0; i < n / (ssize_t)sizeof(m[0]); i++) {
        struct uloop_reply r = {.id = m[i].id};
        if (delay) usleep(delay * 1000);
        if (m[i].type == ULOOP_MSG_MISS) {
          for (uint64_t done = 0; done < m[i].length;) {
            size_t len = m[i].length - done > sizeof(buf) ? sizeof(buf) : m[i].length - done;
            ssize_t k = pread(src, buf, len, m[i].offset + done);
            if (k <= 0 || pwrite(cache, buf, k, m[i].offset + done) != k) { r.error = -EIO; break; }
            done += k;
          }
          printf("miss %llu+%llu\n", (unsigned long long)m[i].offset, (unsigned long long)m[i].length);
        } else if (m[i].type == ULOOP_MSG_INTENT) {
          printf("intent %llu+%llu\n", (unsigned long long)m[i].offset, (unsigned long long)m[i].length);
        } else if (m[i].type == ULOOP_MSG_BARRIER) {
          uint8_t *p = calloc(1, m[i].length), *d = calloc(1, m[i].length);
          struct uloop_barrier_bits bb = {.id = m[i].id, .present_ptr = (uintptr_t)p, .dirty_ptr = (uintptr_t)d, .length = m[i].length};
          if (ioctl(ctl, ULOOP_IOC_BARRIER_BITS, &bb)) return die("ULOOP_IOC_BARRIER_BITS");
          unsigned np = 0, nd = 0;
          for (uint64_t b = 0; b < m[i].length; b++) np += __builtin_popcount(p[b]), nd += __builtin_popcount(d[b]);
          printf("barrier present=%u dirty=%u\n", np, nd);
          free(p);
          free(d);
        }
        if (write(ctl, &r, sizeof(r)) != sizeof(r)) return die("write");
      }
    }
  }
  return fprintf(stderr, "uloopctl: bad command\n"), 2;
}
