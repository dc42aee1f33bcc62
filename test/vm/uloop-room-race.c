// uloop-room-race: many ROOM upcalls answered while their writers race back for dev->lock, run in
// the test VM against uloop.ko (review11 F-1). A device of all-missing 4 KiB blocks with a credit
// limit of 0: every whole-block write past the limit sends ROOM and waits; the answer raises the
// limit by the grant, so the next write asks again. WRITERS processes write distinct blocks with
// O_DIRECT; this process is the daemon and answers each message with its own write(2), so each
// reply takes and drops dev->lock while the woken writer's worker comes back for it. Before the
// fix, uloop_reply read the ROOM upcall after completing it, from the stack of a waiter that had
// already returned: the mutex's own wait list head was list_del()ed (GPF at 0xdead000000000110).
//   uloop-room-race CACHE_FILE SECONDS WRITERS
// CACHE_FILE: a regular file (its size is the device's, a multiple of 4 KiB). Prints
// "room-race: rooms=N writes=M others=K failed=F" last; exit 0 when every write succeeded.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../../kernel/include/uapi/uloop.h"

#define BS 4096

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

// Writer w of n: blocks w, w + n, w + 2n, ... until the deadline; exit 0 if every write succeeded.
static void writer(const char *devpath, unsigned w, unsigned n, uint64_t blocks, double until, int out) {
  void *buf = aligned_alloc(BS, BS);
  int d = open(devpath, O_WRONLY | O_DIRECT);
  uint64_t done = 0;
  int bad = !buf || d < 0;
  if (buf) memset(buf, 0x5a, BS);
  for (uint64_t b = w; !bad && b < blocks && now() < until; b += n) {
    if (pwrite(d, buf, BS, b * BS) != BS) bad = 1;
    else done++;
  }
  if (write(out, &done, sizeof(done)) != sizeof(done)) bad = 1;
  _exit(bad);
}

int main(int argc, char **argv) {
  if (argc != 4) return fprintf(stderr, "usage: uloop-room-race CACHE SECONDS WRITERS\n"), 2;
  double until = now() + atof(argv[2]);
  unsigned nw = atoi(argv[3]);
  int cache = open(argv[1], O_RDWR);
  struct stat st;
  if (cache < 0 || fstat(cache, &st)) return perror("cache"), 2;
  uint64_t blocks = st.st_size / BS;
  uint8_t *zeros = calloc(1, (blocks + 7) / 8);
  int ctl = open("/dev/" ULOOP_CONTROL_NAME, O_RDWR | O_CLOEXEC | O_NONBLOCK);
  if (ctl < 0 || !zeros) return perror("/dev/uloop-control"), 2;
  struct uloop_add a = {.version = ULOOP_ABI_VERSION, .cache_fd = cache, .size = blocks * BS, .block_size = BS,
                        .flags = ULOOP_F_WRITEBACK, .present_ptr = (uintptr_t)zeros, .dirty_ptr = (uintptr_t)zeros,
                        .index = ULOOP_INDEX_ANY};
  if (ioctl(ctl, ULOOP_IOC_ADD, &a)) return perror("ADD"), 2;
  struct uloop_credit cr = {.flags = ULOOP_CREDIT_F_LIMIT, .limit = 0};
  if (ioctl(ctl, ULOOP_IOC_CREDIT, &cr)) return perror("CREDIT"), 2;
  char devpath[64];
  snprintf(devpath, sizeof(devpath), "/dev/uloop%u", a.index);
  int pipefd[2];
  if (pipe(pipefd)) return perror("pipe"), 2;
  for (unsigned w = 0; w < nw; w++) {
    pid_t pid = fork();
    if (pid < 0) return perror("fork"), 2;
    if (!pid) {
      close(ctl);
      close(pipefd[0]);
      writer(devpath, w, nw, blocks, until, pipefd[1]);
    }
  }
  close(pipefd[1]);

  // The daemon: every message answered with success, one reply per write(2).
  uint64_t rooms = 0, others = 0;
  unsigned left = nw, failed = 0;
  while (left) {
    struct pollfd p = {.fd = ctl, .events = POLLIN};
    if (poll(&p, 1, 50) > 0) {
      struct uloop_msg m[32];
      ssize_t r = read(ctl, m, sizeof(m));
      for (ssize_t i = 0; r > 0 && i < r / (ssize_t)sizeof(m[0]); i++) {
        struct uloop_reply rep = {.id = m[i].id};
        if (m[i].type == ULOOP_MSG_ROOM) rooms++;
        else others++;
        if (write(ctl, &rep, sizeof(rep)) != sizeof(rep)) perror("reply"), failed++;
      }
    }
    int status;
    while (waitpid(-1, &status, WNOHANG) > 0) {
      left--;
      if (!WIFEXITED(status) || WEXITSTATUS(status)) failed++;
    }
  }
  uint64_t writes = 0, n;
  while (read(pipefd[0], &n, sizeof(n)) == sizeof(n)) writes += n;
  uint32_t index = a.index;
  if (ioctl(ctl, ULOOP_IOC_REMOVE, &index)) perror("REMOVE"), failed++;
  printf("room-race: rooms=%llu writes=%llu others=%llu failed=%u\n", (unsigned long long)rooms,
         (unsigned long long)writes, (unsigned long long)others, failed);
  return failed ? 1 : 0;
}
