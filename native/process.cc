// Process-level settings the daemon needs from the kernel.
#include "addon.h"

#include <errno.h>
#include <sys/prctl.h>
#include <unistd.h>

#ifndef PR_SET_IO_FLUSHER
#define PR_SET_IO_FLUSHER 57
#endif

namespace ulob {

namespace {

// setIoFlusher(): PR_SET_IO_FLUSHER on the calling thread. A daemon serving a block device (loop
// over a FUSE file) must not have its own allocations wait for writeback of that very device, or
// it deadlocks under memory pressure. The flag is per task and inherited at clone, so it must be
// set on the main thread before libuv's threadpool and any child (nbdfuse) start.
Napi::Value SetIoFlusher(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0) {
    ThrowErrno(env, errno, "prctl(PR_SET_IO_FLUSHER)");
    return Napi::Value();
  }
  return env.Undefined();
}

// isIoFlusher(): PR_GET_IO_FLUSHER, to verify the flag in tests and status.
Napi::Value IsIoFlusher(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int r = prctl(PR_SET_IO_FLUSHER + 1, 0, 0, 0, 0);  // PR_GET_IO_FLUSHER = 58
  if (r < 0) {
    ThrowErrno(env, errno, "prctl(PR_GET_IO_FLUSHER)");
    return Napi::Value();
  }
  return Napi::Boolean::New(env, r == 1);
}

// redirectStdio(fd): points stdout and stderr (fds 1 and 2) at `fd`, as a shell's `>>LOG 2>&1`
// does; the caller closes `fd` afterwards. A --daemon child reopens its log with it on SIGHUP
// (logrotate): what bypasses the logger (a crash's stack, node's warnings) follows too. dup2 is
// atomic, so a write racing it lands in the old file or the new one, never nowhere.
Napi::Value RedirectStdio(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!ArgFd(info, 0, &fd)) return Napi::Value();
  for (int target : {1, 2}) {
    if (fd != target && dup2(fd, target) < 0) {
      ThrowErrno(env, errno, "dup2");
      return Napi::Value();
    }
  }
  return env.Undefined();
}

}  // namespace

bool InitProcess(Napi::Env env, Napi::Object exports) {
  return Export<SetIoFlusher>(env, exports, "setIoFlusher") &&
         Export<IsIoFlusher>(env, exports, "isIoFlusher") &&
         Export<RedirectStdio>(env, exports, "redirectStdio");
}

}  // namespace ulob
