// Block device ioctls. Synchronous: they answer from the block layer's
// in-memory state (BLKFLSBUF only writes back the device's page cache).
#include <errno.h>
#include <linux/fs.h>
#include <linux/loop.h>
#include <sys/ioctl.h>

#include <cstdint>

#include "addon.h"

namespace ulob {

namespace {

// blkGetSize64(fd) -> number (bytes)
Napi::Value BlkGetSize64(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!ArgFd(info, 0, &fd)) return Napi::Value();
  uint64_t size = 0;
  if (ioctl(fd, BLKGETSIZE64, &size) < 0) {
    ThrowErrno(env, errno, "ioctl(BLKGETSIZE64)");
    return Napi::Value();
  }
  // Exact for anything below 8 PiB, i.e. every real device.
  return Napi::Number::New(env, static_cast<double>(size));
}

// blkSectorSize(fd) -> number (logical sector size in bytes)
Napi::Value BlkSectorSize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!ArgFd(info, 0, &fd)) return Napi::Value();
  int size = 0;
  if (ioctl(fd, BLKSSZGET, &size) < 0) {
    ThrowErrno(env, errno, "ioctl(BLKSSZGET)");
    return Napi::Value();
  }
  return Napi::Number::New(env, size);
}

// blkPhysicalSectorSize(fd) -> number (physical block size in bytes: the unit the disk writes
// without a read-modify-write, 4096 on a 512e disk whose logical sectors are 512)
Napi::Value BlkPhysicalSectorSize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!ArgFd(info, 0, &fd)) return Napi::Value();
  unsigned int size = 0;
  if (ioctl(fd, BLKPBSZGET, &size) < 0) {
    ThrowErrno(env, errno, "ioctl(BLKPBSZGET)");
    return Napi::Value();
  }
  return Napi::Number::New(env, size);
}

// blkFlsBuf(fd) -> undefined
Napi::Value BlkFlsBuf(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!ArgFd(info, 0, &fd)) return Napi::Value();
  if (ioctl(fd, BLKFLSBUF, 0) < 0) {
    ThrowErrno(env, errno, "ioctl(BLKFLSBUF)");
    return Napi::Value();
  }
  return env.Undefined();
}

// loopBacking(fd) -> { device, inode } of a loop device's backing file (LOOP_GET_STATUS64).
// Answered from the loop driver's state: unlike stat() of the backing path it never touches the
// file's filesystem, which may be a FUSE mount that no longer answers.
Napi::Value LoopBacking(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!ArgFd(info, 0, &fd)) return Napi::Value();
  struct loop_info64 li = {};
  if (ioctl(fd, LOOP_GET_STATUS64, &li) < 0) {
    ThrowErrno(env, errno, "ioctl(LOOP_GET_STATUS64)");
    return Napi::Value();
  }
  Napi::Object out = Napi::Object::New(env);
  out.Set("device", Napi::Number::New(env, static_cast<double>(li.lo_device)));
  out.Set("inode", Napi::Number::New(env, static_cast<double>(li.lo_inode)));
  if (env.IsExceptionPending()) return Napi::Value();
  return out;
}

// BLKZEROOUT on the threadpool: the device may write the zeros itself (WRITE ZEROES, WRITE SAME)
// or the block layer writes zero pages; either way it can take a while.
class ZeroOutWorker : public PromiseWorker {
 public:
  ZeroOutWorker(Napi::Env env, int fd, uint64_t offset, uint64_t length)
      : PromiseWorker(env, "ulob:blkzeroout", "ioctl(BLKZEROOUT)"), fd_(fd) {
    range_[0] = offset;
    range_[1] = length;
  }

  void Execute() override {
    while (ioctl(fd_, BLKZEROOUT, range_) < 0) {
      if (errno != EINTR) {
        err_ = errno;
        return;
      }
    }
  }

 private:
  int fd_;
  uint64_t range_[2];
};

// blkZeroOut(fd, offset, length) -> Promise<void>: [offset, offset + length) of the device reads
// as zeros afterwards (not durable before a flush of the device, as any write).
Napi::Value BlkZeroOut(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  int64_t offset, length;
  if (!ArgFd(info, 0, &fd) || !ArgInt64(info, 1, &offset) || !ArgInt64(info, 2, &length)) {
    return Napi::Value();
  }
  return StartWorker(env, new ZeroOutWorker(env, fd, static_cast<uint64_t>(offset),
                                            static_cast<uint64_t>(length)));
}

// loopCtlAdd(fd, index) -> number: LOOP_CTL_ADD on /dev/loop-control, as losetup does for a
// /dev/loopN that does not exist yet. Returns the index the kernel made (EEXIST if it exists).
Napi::Value LoopCtlAdd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  int64_t index;
  if (!ArgFd(info, 0, &fd) || !ArgInt64(info, 1, &index)) return Napi::Value();
  int nr = ioctl(fd, LOOP_CTL_ADD, static_cast<long>(index));
  if (nr < 0) {
    ThrowErrno(env, errno, "ioctl(LOOP_CTL_ADD)");
    return Napi::Value();
  }
  return Napi::Number::New(env, nr);
}

// loopCtlRemove(fd, index) -> undefined: LOOP_CTL_REMOVE (EBUSY while bound or open).
Napi::Value LoopCtlRemove(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  int64_t index;
  if (!ArgFd(info, 0, &fd) || !ArgInt64(info, 1, &index)) return Napi::Value();
  if (ioctl(fd, LOOP_CTL_REMOVE, static_cast<long>(index)) < 0) {
    ThrowErrno(env, errno, "ioctl(LOOP_CTL_REMOVE)");
    return Napi::Value();
  }
  return env.Undefined();
}

// loopClearAutoclear(fd) -> boolean: turns off LO_FLAGS_AUTOCLEAR, which LOOP_CLR_FD sets instead
// of unbinding while the device is still open; true if it was set. A detach that then finds the
// device open takes its LOOP_CLR_FD back this way, so the device stays bound.
Napi::Value LoopClearAutoclear(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!ArgFd(info, 0, &fd)) return Napi::Value();
  struct loop_info64 li = {};
  if (ioctl(fd, LOOP_GET_STATUS64, &li) < 0) {
    ThrowErrno(env, errno, "ioctl(LOOP_GET_STATUS64)");
    return Napi::Value();
  }
  if (!(li.lo_flags & LO_FLAGS_AUTOCLEAR)) return Napi::Boolean::New(env, false);
  li.lo_flags &= ~static_cast<__u32>(LO_FLAGS_AUTOCLEAR);
  if (ioctl(fd, LOOP_SET_STATUS64, &li) < 0) {
    ThrowErrno(env, errno, "ioctl(LOOP_SET_STATUS64)");
    return Napi::Value();
  }
  return Napi::Boolean::New(env, true);
}

}  // namespace

bool InitBlkdev(Napi::Env env, Napi::Object exports) {
  return Export<BlkGetSize64>(env, exports, "blkGetSize64") &&
         Export<BlkSectorSize>(env, exports, "blkSectorSize") &&
         Export<BlkPhysicalSectorSize>(env, exports, "blkPhysicalSectorSize") &&
         Export<BlkFlsBuf>(env, exports, "blkFlsBuf") &&
         Export<LoopBacking>(env, exports, "loopBacking") &&
         Export<BlkZeroOut>(env, exports, "blkZeroOut") &&
         Export<LoopCtlAdd>(env, exports, "loopCtlAdd") &&
         Export<LoopCtlRemove>(env, exports, "loopCtlRemove") &&
         Export<LoopClearAutoclear>(env, exports, "loopClearAutoclear");
}

}  // namespace ulob
