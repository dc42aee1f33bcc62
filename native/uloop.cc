// The uloop control device (kernel/include/uapi/uloop.h): ioctls as plain synchronous calls (each
// is a few microseconds of kernel work), and the request channel on the env's libuv loop: a
// uv_poll_t on the non-blocking control fd; each readable event reads whole messages and hands
// them to JS inside a callback scope.
#include <errno.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <uv.h>

#include "../kernel/include/uapi/uloop.h"
#include "addon.h"

namespace ulob {

namespace {

bool ArgU32(const Napi::CallbackInfo& info, size_t i, uint32_t* out) {
  int64_t v;
  if (!ArgInt64(info, i, &v)) return false;
  if (v < 0 || v > 0xffffffffLL) {
    Napi::RangeError::New(info.Env(), "out of range").ThrowAsJavaScriptException();
    return false;
  }
  *out = static_cast<uint32_t>(v);
  return true;
}

// uloopOpen(): a non-blocking fd of /dev/uloop-control.
Napi::Value Open(const Napi::CallbackInfo& info) {
  int fd = ::open("/dev/" ULOOP_CONTROL_NAME, O_RDWR | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) {
    ThrowErrno(info.Env(), errno, "open(/dev/" ULOOP_CONTROL_NAME ")");
    return Napi::Value();
  }
  return Napi::Number::New(info.Env(), fd);
}

// uloopAdd(fd, cacheFd, size, blockSize, flags, present, dirty, index) -> index
Napi::Value Add(const Napi::CallbackInfo& info) {
  int fd, cache_fd;
  int64_t size;
  uint32_t block_size, flags;
  Bytes present, dirty;
  if (!ArgFd(info, 0, &fd) || !ArgFd(info, 1, &cache_fd) || !ArgInt64(info, 2, &size) ||
      !ArgU32(info, 3, &block_size) || !ArgU32(info, 4, &flags) || !ArgBytes(info, 5, &present) ||
      !ArgBytes(info, 6, &dirty))
    return Napi::Value();
  int64_t want;
  if (!ArgInt64(info, 7, &want)) return Napi::Value();
  uint64_t need = (static_cast<uint64_t>(size) / block_size + 8) / 8;
  if (size <= 0 || block_size == 0 || present.length + 1 < need || dirty.length + 1 < need) {
    Napi::RangeError::New(info.Env(), "bitmap too small").ThrowAsJavaScriptException();
    return Napi::Value();
  }
  struct uloop_add a = {};
  a.version = ULOOP_ABI_VERSION;
  a.cache_fd = cache_fd;
  a.size = static_cast<uint64_t>(size);
  a.block_size = block_size;
  a.flags = flags;
  a.index = want < 0 ? ULOOP_INDEX_ANY : static_cast<uint32_t>(want);
  a.present_ptr = reinterpret_cast<uintptr_t>(present.data);
  a.dirty_ptr = reinterpret_cast<uintptr_t>(dirty.data);
  if (ioctl(fd, ULOOP_IOC_ADD, &a) != 0) {
    ThrowErrno(info.Env(), errno, "ioctl(ULOOP_IOC_ADD)");
    return Napi::Value();
  }
  return Napi::Number::New(info.Env(), a.index);
}

// uloopRemove(fd, index) / uloopAttach(fd, index)
Napi::Value Remove(const Napi::CallbackInfo& info) {
  int fd;
  uint32_t index;
  if (!ArgFd(info, 0, &fd) || !ArgU32(info, 1, &index)) return Napi::Value();
  if (ioctl(fd, ULOOP_IOC_REMOVE, &index) != 0) {
    ThrowErrno(info.Env(), errno, "ioctl(ULOOP_IOC_REMOVE)");
    return Napi::Value();
  }
  return info.Env().Undefined();
}

Napi::Value Attach(const Napi::CallbackInfo& info) {
  int fd;
  struct uloop_attach a = {};
  if (!ArgFd(info, 0, &fd) || !ArgU32(info, 1, &a.index)) return Napi::Value();
  a.version = ULOOP_ABI_VERSION;
  if (ioctl(fd, ULOOP_IOC_ATTACH, &a) != 0) {
    ThrowErrno(info.Env(), errno, "ioctl(ULOOP_IOC_ATTACH)");
    return Napi::Value();
  }
  return info.Env().Undefined();
}

// uloopQuery(fd, index) -> { size, blockSize, presentBlocks, dirtyBlocks, epoch, attached, waiting }
Napi::Value Query(const Napi::CallbackInfo& info) {
  int fd;
  struct uloop_info q = {};
  if (!ArgFd(info, 0, &fd) || !ArgU32(info, 1, &q.index)) return Napi::Value();
  if (ioctl(fd, ULOOP_IOC_QUERY, &q) != 0) {
    ThrowErrno(info.Env(), errno, "ioctl(ULOOP_IOC_QUERY)");
    return Napi::Value();
  }
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("size", Napi::Number::New(env, static_cast<double>(q.size)));
  o.Set("blockSize", Napi::Number::New(env, q.block_size));
  o.Set("blocks", Napi::Number::New(env, static_cast<double>(q.nr_blocks)));
  o.Set("presentBlocks", Napi::Number::New(env, static_cast<double>(q.present_blocks)));
  o.Set("dirtyBlocks", Napi::Number::New(env, static_cast<double>(q.dirty_blocks)));
  o.Set("epoch", Napi::Number::New(env, static_cast<double>(q.epoch)));
  o.Set("attached", Napi::Boolean::New(env, q.attached != 0));
  o.Set("waiting", Napi::Number::New(env, q.waiting));
  return o;
}

// uloopBarrierBits(fd, id, present, dirty): the bits barrier `id` carries, into the two buffers.
Napi::Value BarrierBits(const Napi::CallbackInfo& info) {
  int fd;
  int64_t id;
  Bytes present, dirty;
  if (!ArgFd(info, 0, &fd) || !ArgInt64(info, 1, &id) || !ArgBytes(info, 2, &present) ||
      !ArgBytes(info, 3, &dirty))
    return Napi::Value();
  struct uloop_barrier_bits b = {};
  b.id = static_cast<uint64_t>(id);
  b.present_ptr = reinterpret_cast<uintptr_t>(present.data);
  b.dirty_ptr = reinterpret_cast<uintptr_t>(dirty.data);
  b.length = present.length < dirty.length ? present.length : dirty.length;
  if (ioctl(fd, ULOOP_IOC_BARRIER_BITS, &b) != 0) {
    ThrowErrno(info.Env(), errno, "ioctl(ULOOP_IOC_BARRIER_BITS)");
    return Napi::Value();
  }
  return info.Env().Undefined();
}

// uloopEpochBegin(fd, dirty) -> epoch: the kernel's dirty bitmap as of now, into `dirty`; from now
// on the kernel records the blocks written (see uloop.h).
Napi::Value EpochBegin(const Napi::CallbackInfo& info) {
  int fd;
  Bytes dirty;
  if (!ArgFd(info, 0, &fd) || !ArgBytes(info, 1, &dirty)) return Napi::Value();
  struct uloop_epoch e = {};
  e.dirty_ptr = reinterpret_cast<uintptr_t>(dirty.data);
  e.length = dirty.length;
  if (ioctl(fd, ULOOP_IOC_EPOCH_BEGIN, &e) != 0) {
    ThrowErrno(info.Env(), errno, "ioctl(ULOOP_IOC_EPOCH_BEGIN)");
    return Napi::Value();
  }
  return Napi::Number::New(info.Env(), static_cast<double>(e.epoch));
}

// uloopEpochCommit(fd, epoch, flushed) -> cleared: `flushed` (the blocks written back) is narrowed
// in place to the blocks whose dirty bit the kernel cleared.
Napi::Value EpochCommit(const Napi::CallbackInfo& info) {
  int fd;
  int64_t epoch;
  Bytes flushed;
  if (!ArgFd(info, 0, &fd) || !ArgInt64(info, 1, &epoch) || !ArgBytes(info, 2, &flushed))
    return Napi::Value();
  struct uloop_epoch e = {};
  e.dirty_ptr = reinterpret_cast<uintptr_t>(flushed.data);
  e.length = flushed.length;
  e.epoch = static_cast<uint64_t>(epoch);
  if (ioctl(fd, ULOOP_IOC_EPOCH_COMMIT, &e) != 0) {
    ThrowErrno(info.Env(), errno, "ioctl(ULOOP_IOC_EPOCH_COMMIT)");
    return Napi::Value();
  }
  return Napi::Number::New(info.Env(), static_cast<double>(e.cleared));
}

// uloopReply(fd, id, error): error 0 or a negative errno.
Napi::Value Reply(const Napi::CallbackInfo& info) {
  int fd;
  int64_t id, error;
  if (!ArgFd(info, 0, &fd) || !ArgInt64(info, 1, &id) || !ArgInt64(info, 2, &error))
    return Napi::Value();
  struct uloop_reply r = {};
  r.id = static_cast<uint64_t>(id);
  r.error = static_cast<int32_t>(error);
  if (::write(fd, &r, sizeof(r)) != static_cast<ssize_t>(sizeof(r))) {
    ThrowErrno(info.Env(), errno, "write(uloop reply)");
    return Napi::Value();
  }
  return info.Env().Undefined();
}

// The watch of one control fd. Owner: JS holds it as an External until uloopUnwatch, which stops
// the poll and closes the handle; the close callback deletes it. The fd stays the caller's and is
// closed by the caller only after unwatch.
struct Watch {
  uv_poll_t poll;
  napi_env env;
  int fd;
  Napi::FunctionReference callback;
  Napi::ObjectReference resource;  // async resource of the callback scope
};

void OnReadable(uv_poll_t* handle, int status, int /*events*/) {
  Watch* w = static_cast<Watch*>(handle->data);
  Napi::Env env(w->env);
  Napi::HandleScope scope(env);
  Napi::Array msgs = Napi::Array::New(env);
  int err = status < 0 ? -status : 0;
  uint32_t n = 0;
  while (err == 0) {
    struct uloop_msg m[64];
    ssize_t r = ::read(w->fd, m, sizeof(m));
    if (r < 0) {
      if (errno != EAGAIN && errno != EINTR) err = errno;
      break;
    }
    for (size_t i = 0; i < static_cast<size_t>(r) / sizeof(m[0]); i++) {
      Napi::Object o = Napi::Object::New(env);
      o.Set("id", Napi::Number::New(env, static_cast<double>(m[i].id)));
      o.Set("type", Napi::Number::New(env, m[i].type));
      o.Set("offset", Napi::Number::New(env, static_cast<double>(m[i].offset)));
      o.Set("length", Napi::Number::New(env, static_cast<double>(m[i].length)));
      msgs.Set(n++, o);
    }
  }
  Napi::Value error = err ? ErrnoError(env, err, "read(uloop)") : env.Null();
  if (error.IsEmpty()) return;
  if (err) uv_poll_stop(&w->poll);
  Napi::AsyncContext context(env, "ulob:uloop", w->resource.Value());
  Napi::CallbackScope cbscope(env, context);
  w->callback.MakeCallback(w->resource.Value(), {error, msgs}, context);
}

// uloopWatch(fd, callback(err, msgs)) -> handle
Napi::Value WatchFd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!ArgFd(info, 0, &fd)) return Napi::Value();
  if (!info[1].IsFunction()) {
    Napi::TypeError::New(env, "callback").ThrowAsJavaScriptException();
    return Napi::Value();
  }
  uv_loop_t* loop = nullptr;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok) return Napi::Value();
  Watch* w = new Watch();
  w->env = env;
  w->fd = fd;
  w->callback = Napi::Persistent(info[1].As<Napi::Function>());
  w->resource = Napi::Persistent(Napi::Object::New(env));
  int r = uv_poll_init(loop, &w->poll, fd);
  if (r == 0) {
    w->poll.data = w;
    r = uv_poll_start(&w->poll, UV_READABLE, OnReadable);
    if (r != 0) {
      uv_close(reinterpret_cast<uv_handle_t*>(&w->poll), [](uv_handle_t* h) { delete static_cast<Watch*>(h->data); });
    }
  } else {
    delete w;
  }
  if (r != 0) {
    ThrowErrno(env, -r, "uv_poll_start");
    return Napi::Value();
  }
  return Napi::External<Watch>::New(env, w);
}

// uloopUnwatch(handle): stops and closes the poll; the fd may be closed after this returns.
// Called once per handle (src/native/uloop.ts guarantees it).
Napi::Value Unwatch(const Napi::CallbackInfo& info) {
  if (!info[0].IsExternal()) {
    Napi::TypeError::New(info.Env(), "handle").ThrowAsJavaScriptException();
    return Napi::Value();
  }
  Watch* w = info[0].As<Napi::External<Watch>>().Data();
  uv_poll_stop(&w->poll);
  uv_close(reinterpret_cast<uv_handle_t*>(&w->poll), [](uv_handle_t* h) {
    Watch* watch = static_cast<Watch*>(h->data);
    watch->callback.Reset();
    watch->resource.Reset();
    delete watch;
  });
  return info.Env().Undefined();
}

// uloopAbi: the constants of uloop.h this addon is compiled against, so src/native/uloop.ts reads
// them instead of retyping them. Frozen: nothing in JS may change them.
bool ExportAbi(Napi::Env env, Napi::Object exports) {
  Napi::Object abi = Napi::Object::New(env);
  abi.Set("ABI_VERSION", Napi::Number::New(env, ULOOP_ABI_VERSION));
  abi.Set("CONTROL_NAME", Napi::String::New(env, ULOOP_CONTROL_NAME));
  abi.Set("INDEX_ANY", Napi::Number::New(env, ULOOP_INDEX_ANY));
  abi.Set("F_WRITEBACK", Napi::Number::New(env, ULOOP_F_WRITEBACK));
  abi.Set("MSG_MISS", Napi::Number::New(env, ULOOP_MSG_MISS));
  abi.Set("MSG_INTENT", Napi::Number::New(env, ULOOP_MSG_INTENT));
  abi.Set("MSG_BARRIER", Napi::Number::New(env, ULOOP_MSG_BARRIER));
  if (env.IsExceptionPending()) return false;
  abi.Freeze();
  if (env.IsExceptionPending()) return false;
  exports.Set("uloopAbi", abi);
  return !env.IsExceptionPending();
}

}  // namespace

bool InitUloop(Napi::Env env, Napi::Object exports) {
  return ExportAbi(env, exports) && Export<Open>(env, exports, "uloopOpen") && Export<Add>(env, exports, "uloopAdd") &&
         Export<Remove>(env, exports, "uloopRemove") && Export<Attach>(env, exports, "uloopAttach") &&
         Export<Query>(env, exports, "uloopQuery") &&
         Export<BarrierBits>(env, exports, "uloopBarrierBits") &&
         Export<EpochBegin>(env, exports, "uloopEpochBegin") &&
         Export<EpochCommit>(env, exports, "uloopEpochCommit") &&
         Export<Reply>(env, exports, "uloopReply") && Export<WatchFd>(env, exports, "uloopWatch") &&
         Export<Unwatch>(env, exports, "uloopUnwatch");
}

}  // namespace ulob
