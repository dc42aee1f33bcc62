// ulobctl: asks a ulobdev daemon's control socket one request and prints its one-line JSON answer,
// for the VM tests' status reads. `ulobdev status --json DEVICE` sends the same {"cmd":"status"}
// (src/daemon/control.ts: one JSON line each way) and prints the answer's `status`, but each run
// is a Node start: seconds of guest time under TCG, where this costs milliseconds. The tests pipe
// the answer to jq.
//
//   ulobctl SOCKET [REQUEST]     REQUEST defaults to {"cmd":"status"}; exit 1 on any failure
//                                (no daemon, no answer in 60 s, an answer without a newline)
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

int main(int argc, char **argv) {
  if (argc < 2 || argc > 3) {
    fprintf(stderr, "usage: ulobctl SOCKET [REQUEST]\n");
    return 2;
  }
  const char *req = argc == 3 ? argv[2] : "{\"cmd\":\"status\"}";
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  if (strlen(argv[1]) >= sizeof sa.sun_path) {
    fprintf(stderr, "ulobctl: socket path too long\n");
    return 1;
  }
  strcpy(sa.sun_path, argv[1]);
  int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
    fprintf(stderr, "ulobctl: %s: %s\n", argv[1], strerror(errno));
    return 1;
  }
  size_t len = strlen(req);
  char *line = malloc(len + 2);
  if (!line) return 1;
  memcpy(line, req, len);
  line[len] = '\n';
  for (size_t off = 0; off < len + 1;) {
    ssize_t n = write(fd, line + off, len + 1 - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      fprintf(stderr, "ulobctl: write: %s\n", strerror(errno));
      return 1;
    }
    off += (size_t)n;
  }
  size_t cap = 1 << 16, got = 0;
  char *buf = malloc(cap);
  if (!buf) return 1;
  for (;;) {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    // As `ulobdev status` (10 s): a status that waits longer is a finding (invariant 8), not slow.
    int r = poll(&p, 1, 10000);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      fprintf(stderr, "ulobctl: no answer from %s\n", argv[1]);
      return 1;
    }
    if (got == cap) {
      cap *= 2;
      buf = realloc(buf, cap);
      if (!buf) return 1;
    }
    ssize_t n = read(fd, buf + got, cap - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      fprintf(stderr, "ulobctl: %s closed without a whole answer\n", argv[1]);
      return 1;
    }
    char *nl = memchr(buf + got, '\n', (size_t)n);
    got += (size_t)n;
    if (nl) {
      fwrite(buf, 1, (size_t)(nl - buf) + 1, stdout);
      return fflush(stdout) == 0 ? 0 : 1;
    }
  }
}
