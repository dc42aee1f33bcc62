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

// A reply's error: 0 or a negative errno (-4095 .. 0), the one signed argument of this file.
// ArgInt64 takes non-negative integers only, and used for this it threw on every error reply.
bool ArgErrno(const Napi::CallbackInfo& info, size_t i, int32_t* out) {
  double d = 0;
  if (napi_get_value_double(info.Env(), info[i], &d) != napi_ok || !(d >= -4095 && d <= 0) ||
      static_cast<double>(static_cast<int32_t>(d)) != d) {
    Napi::RangeError::New(info.Env(), "expected 0 or a negative errno").ThrowAsJavaScriptException();
    return false;
  }
  *out = static_cast<int32_t>(d);
  return true;
}

// Bytes of a bitmap of `bits` bits (one per block or unit, LSB first).
uint64_t BitmapBytes(uint64_t bits) { return bits / 8 + (bits % 8 != 0); }

bool ThrowRange(Napi::Env env, const char* what) {
  Napi::RangeError::New(env, what).ThrowAsJavaScriptException();
  return false;
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

// uloopGetFeatures(fd) -> { version, maxPart, features, maxDevices, ioTimeoutS, maxBlocks }.
// Works on any control fd, whatever ABI the module speaks (the struct's start is fixed).
Napi::Value GetFeatures(const Napi::CallbackInfo& info) {
  int fd;
  if (!ArgFd(info, 0, &fd)) return Napi::Value();
  struct uloop_features f = {};
  if (ioctl(fd, ULOOP_IOC_GET_FEATURES, &f) != 0) {
    ThrowErrno(info.Env(), errno, "ioctl(ULOOP_IOC_GET_FEATURES)");
    return Napi::Value();
  }
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("version", Napi::Number::New(env, f.version));
  o.Set("maxPart", Napi::Number::New(env, f.max_part));
  // Feature bits above 2^53 would not survive a double; none is defined that high.
  o.Set("features", Napi::Number::New(env, static_cast<double>(f.features & ((1ULL << 53) - 1))));
  o.Set("maxDevices", Napi::Number::New(env, f.max_devices));
  o.Set("ioTimeoutS", Napi::Number::New(env, f.io_timeout_s));
  o.Set("maxBlocks", Napi::Number::New(env, static_cast<double>(f.max_blocks)));
  return o;
}

// uloopAdd(fd, cacheFd, size, blockSize, flags, present, dirty, index, logicalBlockSize,
//          physicalBlockSize, unitShift) -> index. index ULOOP_INDEX_ANY: any free N.
Napi::Value Add(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd, cache_fd;
  int64_t size;
  uint32_t block_size, flags, index, lbs, pbs, unit_shift;
  Bytes present, dirty;
  if (!ArgFd(info, 0, &fd) || !ArgFd(info, 1, &cache_fd) || !ArgInt64(info, 2, &size) ||
      !ArgU32(info, 3, &block_size) || !ArgU32(info, 4, &flags) || !ArgBytes(info, 5, &present) ||
      !ArgBytes(info, 6, &dirty) || !ArgU32(info, 7, &index) || !ArgU32(info, 8, &lbs) ||
      !ArgU32(info, 9, &pbs) || !ArgU32(info, 10, &unit_shift))
    return Napi::Value();
  // The block size is checked before it divides anything; the kernel reads exactly
  // bitmap_length bytes at each pointer, so both buffers must hold the whole bitmap.
  if (size <= 0 || block_size == 0) {
    ThrowRange(env, "size and blockSize must be positive");
    return Napi::Value();
  }
  uint64_t need = BitmapBytes(static_cast<uint64_t>(size) / block_size + (size % block_size != 0));
  if (present.length < need || dirty.length < need) {
    ThrowRange(env, "bitmap too small");
    return Napi::Value();
  }
  struct uloop_add a = {};
  a.version = ULOOP_ABI_VERSION;
  a.cache_fd = cache_fd;
  a.size = static_cast<uint64_t>(size);
  a.block_size = block_size;
  a.flags = flags;
  a.index = index;
  a.present_ptr = reinterpret_cast<uintptr_t>(present.data);
  a.dirty_ptr = reinterpret_cast<uintptr_t>(dirty.data);
  a.logical_block_size = lbs;
  a.physical_block_size = pbs;
  a.unit_shift = unit_shift;
  a.bitmap_length = need;
  if (ioctl(fd, ULOOP_IOC_ADD, &a) != 0) {
    ThrowErrno(env, errno, "ioctl(ULOOP_IOC_ADD)");
    return Napi::Value();
  }
  return Napi::Number::New(env, a.index);
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

// uloopQuery(fd, index) -> the fields of struct uloop_info, camelCased (src/native/uloop.ts).
Napi::Value Query(const Napi::CallbackInfo& info) {
  int fd;
  struct uloop_info q = {};
  if (!ArgFd(info, 0, &fd) || !ArgU32(info, 1, &q.index)) return Napi::Value();
  q.version = ULOOP_ABI_VERSION;
  if (ioctl(fd, ULOOP_IOC_QUERY, &q) != 0) {
    ThrowErrno(info.Env(), errno, "ioctl(ULOOP_IOC_QUERY)");
    return Napi::Value();
  }
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  auto u64 = [&](const char* k, uint64_t v) { o.Set(k, Napi::Number::New(env, static_cast<double>(v))); };
  u64("size", q.size);
  u64("blockSize", q.block_size);
  u64("flags", q.flags);
  u64("blocks", q.nr_blocks);
  u64("presentBlocks", q.present_blocks);
  u64("dirtyBlocks", q.dirty_blocks);
  u64("epoch", q.epoch);
  o.Set("attached", Napi::Boolean::New(env, q.attached != 0));
  u64("waiting", q.waiting);
  o.Set("error", Napi::Number::New(env, q.error));
  u64("state", q.state);
  u64("zeroBlocks", q.zero_blocks);
  u64("pendingBlocks", q.pending_blocks);
  u64("claimedBlocks", q.claimed_blocks);
  u64("readHits", q.read_hits);
  u64("readMisses", q.read_misses);
  u64("writeHits", q.write_hits);
  u64("writeUpcalls", q.write_upcalls);
  u64("readBytes", q.read_bytes);
  u64("writeBytes", q.write_bytes);
  u64("zeroBytes", q.zero_bytes);
  u64("flushes", q.flushes);
  u64("barriers", q.barriers);
  u64("timeouts", q.timeouts);
  u64("ioErrors", q.io_errors);
  u64("lateReplies", q.late_replies);
  u64("memBytes", q.mem_bytes);
  u64("inflight", q.inflight);
  u64("logicalBlockSize", q.logical_block_size);
  u64("physicalBlockSize", q.physical_block_size);
  u64("unitShift", q.unit_shift);
  u64("unaskedBlocks", q.unasked_blocks);
  // ULOOP_CREDIT_NONE (2^64 - 1) as -1: no limit (a double cannot hold it exactly)
  o.Set("creditLimit", Napi::Number::New(env, q.credit_limit == ULOOP_CREDIT_NONE ? -1.0 : static_cast<double>(q.credit_limit)));
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

// uloopClearError(fd, dropped) -> { error, dropped }: the kernel re-syncs the cache file, drops
// the blocks set aside at the failed sync (their bits into `dropped`, a whole-device bitmap or an
// empty buffer for none) and serves writes again.
Napi::Value ClearError(const Napi::CallbackInfo& info) {
  int fd;
  Bytes dropped;
  if (!ArgFd(info, 0, &fd) || !ArgBytes(info, 1, &dropped)) return Napi::Value();
  struct uloop_clear_error c = {};
  c.dropped_ptr = dropped.length ? reinterpret_cast<uintptr_t>(dropped.data) : 0;
  c.length = dropped.length;
  if (ioctl(fd, ULOOP_IOC_CLEAR_ERROR, &c) != 0) {
    ThrowErrno(info.Env(), errno, "ioctl(ULOOP_IOC_CLEAR_ERROR)");
    return Napi::Value();
  }
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("error", Napi::Number::New(env, c.error));
  o.Set("dropped", Napi::Number::New(env, static_cast<double>(c.dropped)));
  return o;
}

// The block-range ioctls (struct uloop_blocks): uloopBlocks(fd, op, first, count, bits, id) ->
// { done, id }. op: 0 CLAIM, 1 FILLED, 2 EVICT, 3 ACCESSED, 4 EPOCH_RELEASE. `bits` must hold
// ceil(count / 8) bytes (EPOCH_RELEASE: may be empty, it reads none).
Napi::Value Blocks(const Napi::CallbackInfo& info) {
  static const struct {
    unsigned long cmd;
    const char* name;
    bool bits;
  } ops[] = {
      {ULOOP_IOC_CLAIM, "ioctl(ULOOP_IOC_CLAIM)", true},
      {ULOOP_IOC_FILLED, "ioctl(ULOOP_IOC_FILLED)", true},
      {ULOOP_IOC_EVICT, "ioctl(ULOOP_IOC_EVICT)", true},
      {ULOOP_IOC_ACCESSED, "ioctl(ULOOP_IOC_ACCESSED)", true},
      {ULOOP_IOC_EPOCH_RELEASE, "ioctl(ULOOP_IOC_EPOCH_RELEASE)", false},
  };
  Napi::Env env = info.Env();
  int fd;
  uint32_t op;
  int64_t first, count, id;
  Bytes bits;
  if (!ArgFd(info, 0, &fd) || !ArgU32(info, 1, &op) || !ArgInt64(info, 2, &first) ||
      !ArgInt64(info, 3, &count) || !ArgBytes(info, 4, &bits) || !ArgInt64(info, 5, &id))
    return Napi::Value();
  if (op >= sizeof(ops) / sizeof(ops[0])) {
    ThrowRange(env, "unknown block-range op");
    return Napi::Value();
  }
  if (ops[op].bits && bits.length < BitmapBytes(static_cast<uint64_t>(count))) {
    ThrowRange(env, "bits too small for count");
    return Napi::Value();
  }
  struct uloop_blocks b = {};
  b.first = static_cast<uint64_t>(first);
  b.count = static_cast<uint64_t>(count);
  b.bits_ptr = ops[op].bits ? reinterpret_cast<uintptr_t>(bits.data) : 0;
  b.id = static_cast<uint64_t>(id);
  for (;;) {
    if (ioctl(fd, ops[op].cmd, &b) == 0) break;
    if (errno == EINTR && op != 2) continue;  // EVICT's EINTR means: nothing evicted
    ThrowErrno(env, errno, ops[op].name);
    return Napi::Value();
  }
  Napi::Object o = Napi::Object::New(env);
  o.Set("done", Napi::Number::New(env, static_cast<double>(b.done)));
  o.Set("id", Napi::Number::New(env, static_cast<double>(b.id)));
  return o;
}

// uloopCredit(fd, limit, on) -> { limit, unasked }: CREDIT on the attached fd. on: a limit of
// `limit` blocks the kernel may write whole while missing without a ROOM upcall; off (limit 0): no
// limit (ULOOP_CREDIT_NONE). Returns the limit now set (-1: none) and the kernel's unasked blocks.
// Throws a NativeError with the errno (EINVAL: a limit above the device's blocks).
Napi::Value Credit(const Napi::CallbackInfo& info) {
  int fd;
  int64_t limit;
  if (!ArgFd(info, 0, &fd) || !ArgInt64(info, 1, &limit)) return Napi::Value();
  struct uloop_credit c = {};
  if (info[2].ToBoolean().Value()) {
    c.flags = ULOOP_CREDIT_F_LIMIT;
    c.limit = static_cast<uint64_t>(limit);
  }
  if (ioctl(fd, ULOOP_IOC_CREDIT, &c) != 0) {
    ThrowErrno(info.Env(), errno, "ioctl(ULOOP_IOC_CREDIT)");
    return Napi::Value();
  }
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("limit", Napi::Number::New(env, c.limit == ULOOP_CREDIT_NONE ? -1.0 : static_cast<double>(c.limit)));
  o.Set("unasked", Napi::Number::New(env, static_cast<double>(c.unasked)));
  return o;
}

// BARRIER (ULOOP_FEAT_BARRIER) on a worker thread: the call waits until this process's own event
// loop has answered the BARRIER upcall it sends, so it must not run on the loop's thread. The
// kernel's wait is killable: a daemon killed meanwhile exits (its fd's release re-queues the
// upcall for the next daemon). Resolves with the blocks handed over.
class BarrierWorker : public PromiseWorker {
 public:
  BarrierWorker(Napi::Env env, int fd, uint32_t flags)
      : PromiseWorker(env, "ulob:uloopBarrier", "ioctl(ULOOP_IOC_BARRIER)"), fd_(fd), flags_(flags) {}

  void Execute() override {
    struct uloop_barrier b = {};
    b.flags = flags_;
    if (ioctl(fd_, ULOOP_IOC_BARRIER, &b) != 0) {
      err_ = errno;
      return;
    }
    taken_ = b.taken;
  }

 protected:
  Napi::Value Result(Napi::Env env) override { return Napi::Number::New(env, static_cast<double>(taken_)); }

 private:
  int fd_;
  uint32_t flags_;
  uint64_t taken_ = 0;
};

// uloopBarrier(fd, flags) -> Promise<number>: the blocks the barrier handed over (0: none were
// pending). Rejects with a NativeError carrying the errno (EINVAL: flags set; EIO: the sticky
// error, a failed sync or an error answer; EINTR; ENOTTY: a module without BARRIER).
Napi::Value Barrier(const Napi::CallbackInfo& info) {
  int fd;
  uint32_t flags;
  if (!ArgFd(info, 0, &fd) || !ArgU32(info, 1, &flags)) return Napi::Value();
  BarrierWorker* w = new BarrierWorker(info.Env(), fd, flags);
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

// uloopReply(fd, id, error): error 0 or a negative errno. The kernel refuses an id that is not
// outstanding (ENOENT) and a record it cannot take (EINVAL); both are thrown as NativeErrors.
Napi::Value Reply(const Napi::CallbackInfo& info) {
  int fd;
  int64_t id;
  int32_t error;
  if (!ArgFd(info, 0, &fd) || !ArgInt64(info, 1, &id) || !ArgErrno(info, 2, &error))
    return Napi::Value();
  struct uloop_reply r = {};
  r.id = static_cast<uint64_t>(id);
  r.error = error;
  ssize_t n;
  do n = ::write(fd, &r, sizeof(r));
  while (n < 0 && errno == EINTR);
  if (n != static_cast<ssize_t>(sizeof(r))) {
    ThrowErrno(info.Env(), n < 0 ? errno : EIO, "write(uloop reply)");
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
      if (errno == EINTR) continue;
      if (errno != EAGAIN) err = errno;
      break;
    }
    if (r == 0) break;
    for (size_t i = 0; i < static_cast<size_t>(r) / sizeof(m[0]); i++) {
      Napi::Object o = Napi::Object::New(env);
      o.Set("id", Napi::Number::New(env, static_cast<double>(m[i].id)));
      o.Set("type", Napi::Number::New(env, m[i].type));
      o.Set("flags", Napi::Number::New(env, m[i].flags));
      o.Set("offset", Napi::Number::New(env, static_cast<double>(m[i].offset)));
      o.Set("length", Napi::Number::New(env, static_cast<double>(m[i].length)));
      o.Set("epoch", Napi::Number::New(env, static_cast<double>(m[i].epoch)));
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
  auto num = [&](const char* k, double v) { abi.Set(k, Napi::Number::New(env, v)); };
  num("ABI_VERSION", ULOOP_ABI_VERSION);
  abi.Set("CONTROL_NAME", Napi::String::New(env, ULOOP_CONTROL_NAME));
  num("INDEX_ANY", ULOOP_INDEX_ANY);
  num("MAX_BLOCKS", static_cast<double>(ULOOP_MAX_BLOCKS));
  num("MAX_RANGE_BLOCKS", ULOOP_MAX_RANGE_BLOCKS);
  num("F_WRITEBACK", ULOOP_F_WRITEBACK);
  num("F_PRESERVE", ULOOP_F_PRESERVE);
  num("F_ZERO", ULOOP_F_ZERO);
  num("F_ACCESSED", ULOOP_F_ACCESSED);
  num("F_PARTSCAN", ULOOP_F_PARTSCAN);
  num("FEAT_COUNTERS", static_cast<double>(ULOOP_FEAT_COUNTERS));
  num("FEAT_STICKY_ERROR", static_cast<double>(ULOOP_FEAT_STICKY_ERROR));
  num("FEAT_IO_TIMEOUT", static_cast<double>(ULOOP_FEAT_IO_TIMEOUT));
  num("FEAT_PRESERVE", static_cast<double>(ULOOP_FEAT_PRESERVE));
  num("FEAT_ZERO", static_cast<double>(ULOOP_FEAT_ZERO));
  num("FEAT_CLAIM", static_cast<double>(ULOOP_FEAT_CLAIM));
  num("FEAT_EVICT", static_cast<double>(ULOOP_FEAT_EVICT));
  num("FEAT_ACCESSED", static_cast<double>(ULOOP_FEAT_ACCESSED));
  num("FEAT_PARTITIONS", static_cast<double>(ULOOP_FEAT_PARTITIONS));
  num("FEAT_SECTOR_SIZE", static_cast<double>(ULOOP_FEAT_SECTOR_SIZE));
  num("FEAT_REPLY_CHECK", static_cast<double>(ULOOP_FEAT_REPLY_CHECK));
  num("FEAT_CREDIT", static_cast<double>(ULOOP_FEAT_CREDIT));
  num("FEAT_BARRIER", static_cast<double>(ULOOP_FEAT_BARRIER));
  num("EVICT_F_PINNED", static_cast<double>(ULOOP_EVICT_F_PINNED));
  num("EVICT_F_HOLD", static_cast<double>(ULOOP_EVICT_F_HOLD));
  num("STATE_EPOCH_OPEN", ULOOP_STATE_EPOCH_OPEN);
  num("STATE_EPOCH_FAILED", ULOOP_STATE_EPOCH_FAILED);
  num("STATE_SCANNING", ULOOP_STATE_SCANNING);
  num("MSG_MISS", ULOOP_MSG_MISS);
  num("MSG_INTENT", ULOOP_MSG_INTENT);
  num("MSG_BARRIER", ULOOP_MSG_BARRIER);
  num("MSG_PRESERVE", ULOOP_MSG_PRESERVE);
  num("MSG_ZERO", ULOOP_MSG_ZERO);
  num("MSG_ROOM", ULOOP_MSG_ROOM);
  num("MSG_F_DISCARD", ULOOP_MSG_F_DISCARD);
  num("MSG_F_NOUNMAP", ULOOP_MSG_F_NOUNMAP);
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
         Export<GetFeatures>(env, exports, "uloopGetFeatures") &&
         Export<ClearError>(env, exports, "uloopClearError") &&
         Export<Blocks>(env, exports, "uloopBlocks") &&
         Export<BarrierBits>(env, exports, "uloopBarrierBits") &&
         Export<EpochBegin>(env, exports, "uloopEpochBegin") &&
         Export<EpochCommit>(env, exports, "uloopEpochCommit") &&
         Export<Reply>(env, exports, "uloopReply") && Export<Credit>(env, exports, "uloopCredit") && Export<Barrier>(env, exports, "uloopBarrier") && Export<WatchFd>(env, exports, "uloopWatch") &&
         Export<Unwatch>(env, exports, "uloopUnwatch");
}

}  // namespace ulob
