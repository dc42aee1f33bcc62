// Positioned file I/O on the libuv threadpool, and aligned buffers for
// O_DIRECT.
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#include "addon.h"

#include <sys/uio.h>

#include <cmath>
#include <utility>
#include <vector>

static_assert(sizeof(off_t) == 8, "build with _FILE_OFFSET_BITS=64");

namespace ulob {

namespace {

// Reads up to `length` bytes at `pos` into `data`, looping over short reads (signals, >2 GiB
// requests, pipes); only EOF (0) ends it early. *done gets the bytes read. Returns 0 or an errno.
int ReadFull(int fd, uint8_t* data, size_t length, off_t pos, size_t* done) {
  while (*done < length) {
    ssize_t n = ::pread(fd, data + *done, length - *done, pos + static_cast<off_t>(*done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (n == 0) return 0;
    *done += static_cast<size_t>(n);
  }
  return 0;
}

// Writes all `length` bytes of `data` at `pos`, looping over short writes. Returns 0 or an errno
// (EIO for a write that makes no progress and sets none: retrying could spin forever).
int WriteFull(int fd, const uint8_t* data, size_t length, off_t pos) {
  size_t done = 0;
  while (done < length) {
    ssize_t n = ::pwrite(fd, data + done, length - done, pos + static_cast<off_t>(done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (n == 0) return EIO;
    done += static_cast<size_t>(n);
  }
  return 0;
}

class PreadWorker : public PromiseWorker {
 public:
  PreadWorker(Napi::Env env, int fd, uint8_t* data, size_t length, off_t pos)
      : PromiseWorker(env, "ulob:pread", "pread"),
        fd_(fd), data_(data), length_(length), pos_(pos) {}

  void Execute() override { err_ = ReadFull(fd_, data_, length_, pos_, &done_); }

  Napi::Value Result(Napi::Env env) override {
    return Napi::Number::New(env, static_cast<double>(done_));
  }

 private:
  int fd_;
  uint8_t* data_;
  size_t length_;
  off_t pos_;
  size_t done_ = 0;
};

class PwriteWorker : public PromiseWorker {
 public:
  PwriteWorker(Napi::Env env, int fd, const uint8_t* data, size_t length, off_t pos)
      : PromiseWorker(env, "ulob:pwrite", "pwrite"),
        fd_(fd), data_(data), length_(length), pos_(pos) {}

  void Execute() override { err_ = WriteFull(fd_, data_, length_, pos_); }

 private:
  int fd_;
  const uint8_t* data_;
  size_t length_;
  off_t pos_;
};

// Many writes in one trip to the threadpool: the writes a busy event loop issues in one turn (and
// the flusher's scattered dirty blocks) would otherwise cost a thread hand-off and, on a loaded
// machine, a wake-up each. Every item is attempted; each gets its own result.
struct WriteItem {
  const uint8_t* data;
  size_t length;
  off_t pos;
  int err;  // positive errno, 0 when written in full
};

class PwriteListWorker : public PromiseWorker {
 public:
  PwriteListWorker(Napi::Env env, int fd, std::vector<WriteItem> items)
      : PromiseWorker(env, "ulob:pwriteList", "pwrite"), fd_(fd), items_(std::move(items)) {}

  // The buffers stay referenced until the worker is deleted (after OnOK).
  void KeepAll(const Napi::Array& buffers) {
    refs_.reserve(buffers.Length());
    for (uint32_t i = 0; i < buffers.Length(); i++) {
      refs_.push_back(Napi::Persistent(buffers.Get(i).As<Napi::Object>()));
    }
  }

  void Execute() override {
    for (WriteItem& it : items_) it.err = WriteFull(fd_, it.data, it.length, it.pos);
  }

  Napi::Value Result(Napi::Env env) override {
    Napi::Int32Array out = Napi::Int32Array::New(env, items_.size());
    for (size_t i = 0; i < items_.size(); i++) out[i] = items_[i].err;
    return out;
  }

 private:
  int fd_;
  std::vector<WriteItem> items_;
  std::vector<Napi::ObjectReference> refs_;
};

// Reads from one file and writes of what they read to another, in one threadpool job. A cache fill
// (disk -> cache file, one range) costs one hand-off to the I/O threads and one wake-up of the event
// loop instead of two of each, which on a loaded machine is most of a fill's time; the flusher's
// batch (cache file -> disk, one large range or many scattered blocks) does its reads here too,
// off the event loop, and several batches run at once on the pool. Every range is read first, then
// every range is written, in order. A short read (the source ended early: a disk that shrank, a
// truncated cache file) stops the job before anything is written: the result, the bytes read up to
// there, is less than asked, and the caller fails the whole fill or batch (a partial copy written
// to the destination would be a piece of data nobody asked for). syscall_ names the step that failed.
struct CopyItem {
  off_t src_pos;
  off_t dst_pos;
  uint8_t* data;
  size_t length;
};

class CopyWorker : public PromiseWorker {
 public:
  CopyWorker(Napi::Env env, int src, int dst, std::vector<CopyItem> items)
      : PromiseWorker(env, "ulob:copyRange", "pread"), src_(src), dst_(dst), items_(std::move(items)),
        done_(items_.size(), 0) {}

  void Execute() override {
    for (size_t i = 0; i < items_.size(); i++) {
      err_ = ReadFull(src_, items_[i].data, items_[i].length, items_[i].src_pos, &done_[i]);
      if (err_ != 0 || done_[i] < items_[i].length) return;
    }
    syscall_ = "pwrite";
    for (size_t i = 0; i < items_.size(); i++) {
      err_ = WriteFull(dst_, items_[i].data, done_[i], items_[i].dst_pos);
      if (err_ != 0) return;
    }
  }

  // The bytes read over all ranges: all of them, also written, or fewer after a short read (then
  // nothing was written).
  Napi::Value Result(Napi::Env env) override {
    double total = 0;
    for (size_t n : done_) total += static_cast<double>(n);
    return Napi::Number::New(env, total);
  }

 private:
  int src_;
  int dst_;
  std::vector<CopyItem> items_;
  std::vector<size_t> done_;
};

// A long sequential copy in one threadpool job, through one buffer: `length` bytes of src from
// src_pos go to dst at dst_pos in pieces of the buffer's size, each piece read whole and then
// written, before the next is read (one reading stream, as `dd` does: a hydration reads the disk
// in order instead of several buffer-sized reads in flight on the pool). With `sequential`, the
// job first tells the kernel the source is read in order (posix_fadvise SEQUENTIAL: a larger
// readahead for a buffered file; nothing for O_DIRECT). A short read (src ended early) stops the
// job before that piece is written: the pieces before it are written, and the result, the bytes
// copied (read and written), is less than asked. An error stops it the same way; syscall_ names
// the step ('pread' src, 'pwrite' dst).
class StreamCopyWorker : public PromiseWorker {
 public:
  StreamCopyWorker(Napi::Env env, int src, off_t src_pos, int dst, off_t dst_pos, uint8_t* data, size_t piece,
                   size_t length, bool sequential)
      : PromiseWorker(env, "ulob:copyStream", "pread"), src_(src), src_pos_(src_pos), dst_(dst),
        dst_pos_(dst_pos), data_(data), piece_(piece), length_(length), sequential_(sequential) {}

  void Execute() override {
    if (sequential_) {
      // Advice only: a failure (ESPIPE on a pipe, EINVAL) changes nothing about the copy.
      (void)::posix_fadvise(src_, src_pos_, static_cast<off_t>(length_), POSIX_FADV_SEQUENTIAL);
    }
    while (done_ < length_) {
      size_t want = length_ - done_ < piece_ ? length_ - done_ : piece_;
      size_t got = 0;
      syscall_ = "pread";
      err_ = ReadFull(src_, data_, want, src_pos_ + static_cast<off_t>(done_), &got);
      if (err_ != 0 || got < want) return;
      syscall_ = "pwrite";
      err_ = WriteFull(dst_, data_, want, dst_pos_ + static_cast<off_t>(done_));
      if (err_ != 0) return;
      done_ += want;
    }
  }

  Napi::Value Result(Napi::Env env) override { return Napi::Number::New(env, static_cast<double>(done_)); }

 private:
  int src_;
  off_t src_pos_;
  int dst_;
  off_t dst_pos_;
  uint8_t* data_;
  size_t piece_;
  size_t length_;
  bool sequential_;
  size_t done_ = 0;
};

class FdatasyncWorker : public PromiseWorker {
 public:
  FdatasyncWorker(Napi::Env env, int fd)
      : PromiseWorker(env, "ulob:fdatasync", "fdatasync"), fd_(fd) {}

  void Execute() override {
    while (::fdatasync(fd_) < 0) {
      if (errno != EINTR) {
        err_ = errno;
        return;
      }
    }
  }

 private:
  int fd_;
};

class FallocateWorker : public PromiseWorker {
 public:
  FallocateWorker(Napi::Env env, int fd, int mode, off_t offset, off_t length)
      : PromiseWorker(env, "ulob:fallocate", "fallocate"),
        fd_(fd), mode_(mode), offset_(offset), length_(length) {}

  void Execute() override {
    while (::fallocate(fd_, mode_, offset_, length_) < 0) {
      if (errno != EINTR) {
        err_ = errno;
        return;
      }
    }
  }

 private:
  int fd_;
  int mode_;
  off_t offset_;
  off_t length_;
};

// The arguments every positioned transfer takes: (fd, buf, bufOffset, length, position).
struct TransferArgs {
  int fd;
  uint8_t* data;
  size_t length;
  off_t pos;
};

// Reads and bounds-checks them; false with a pending exception on failure.
bool ArgTransfer(const Napi::CallbackInfo& info, TransferArgs* out) {
  Bytes buf;
  int64_t off, len, pos;
  if (!ArgFd(info, 0, &out->fd) || !ArgBytes(info, 1, &buf) ||
      !ArgInt64(info, 2, &off) || !ArgInt64(info, 3, &len) ||
      !ArgInt64(info, 4, &pos) || !CheckSlice(info.Env(), buf, off, len)) {
    return false;
  }
  out->data = buf.data + off;
  out->length = static_cast<size_t>(len);
  out->pos = static_cast<off_t>(pos);
  return true;
}

// pread(fd, buf, bufOffset, length, position) -> Promise<number>
// pwrite(fd, buf, bufOffset, length, position) -> Promise<void>
template <bool kWrite>
Napi::Value Transfer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  TransferArgs a;
  if (!ArgTransfer(info, &a)) return Napi::Value();
  PromiseWorker* w;
  if (kWrite) {
    w = new PwriteWorker(env, a.fd, a.data, a.length, a.pos);
  } else {
    w = new PreadWorker(env, a.fd, a.data, a.length, a.pos);
  }
  if (!env.IsExceptionPending()) w->Keep(0, info[1].As<Napi::Object>());
  return StartWorker(env, w);
}

// pwriteList(fd, buffers, positions) -> Promise<Int32Array>: buffers[i] (a Uint8Array) written
// whole at positions[i] (a Float64Array of the same length), in order, in one threadpool job. The
// result holds each write's errno, 0 for success.
Napi::Value PwriteList(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!ArgFd(info, 0, &fd)) return Napi::Value();
  if (!info[1].IsArray()) {
    Napi::TypeError::New(env, "expected an array of Uint8Array").ThrowAsJavaScriptException();
    return Napi::Value();
  }
  Napi::Array buffers = info[1].As<Napi::Array>();
  const double* positions = nullptr;
  size_t count = 0;
  if (!Float64Elements(env, info[2], &positions, &count) || count != buffers.Length()) {
    Napi::TypeError::New(env, "expected a Float64Array of one position per buffer")
        .ThrowAsJavaScriptException();
    return Napi::Value();
  }
  std::vector<WriteItem> items;
  items.reserve(count);
  for (uint32_t i = 0; i < count; i++) {
    Bytes b;
    napi_value v = buffers.Get(i);
    if (env.IsExceptionPending()) return Napi::Value();
    bool is_u8 = false;
    napi_typedarray_type t;
    size_t len = 0;
    void* data = nullptr;
    if (napi_is_typedarray(env, v, &is_u8) != napi_ok || !is_u8 ||
        napi_get_typedarray_info(env, v, &t, &len, &data, nullptr, nullptr) != napi_ok ||
        t != napi_uint8_array) {
      Napi::TypeError::New(env, "expected an array of Uint8Array").ThrowAsJavaScriptException();
      return Napi::Value();
    }
    b.data = static_cast<uint8_t*>(data);
    b.length = len;
    double pos = positions[i];
    if (!(pos >= 0) || pos + static_cast<double>(len) > kMaxSafeInteger || std::trunc(pos) != pos) {
      Napi::RangeError::New(env, "position out of range").ThrowAsJavaScriptException();
      return Napi::Value();
    }
    items.push_back({b.data, b.length, static_cast<off_t>(pos), 0});
  }
  PwriteListWorker* w = new PwriteListWorker(env, fd, std::move(items));
  if (!env.IsExceptionPending()) w->KeepAll(buffers);
  return StartWorker(env, w);
}

// copyRange(srcFd, srcPosition, dstFd, dstPosition, buf, bufOffset, length) -> Promise<number>:
// reads `length` bytes of srcFd at srcPosition into buf[bufOffset..] and writes the bytes read to
// dstFd at dstPosition, in one threadpool job. Resolves with the bytes read: `length`, all written;
// fewer when srcFd ended early, and then nothing is written.
Napi::Value CopyRange(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int src, dst;
  int64_t src_pos, dst_pos, off, len;
  Bytes buf;
  if (!ArgFd(info, 0, &src) || !ArgInt64(info, 1, &src_pos) || !ArgFd(info, 2, &dst) ||
      !ArgInt64(info, 3, &dst_pos) || !ArgBytes(info, 4, &buf) || !ArgInt64(info, 5, &off) ||
      !ArgInt64(info, 6, &len) || !CheckSlice(env, buf, off, len)) {
    return Napi::Value();
  }
  if (src_pos < 0 || dst_pos < 0) {
    Napi::RangeError::New(env, "position out of range").ThrowAsJavaScriptException();
    return Napi::Value();
  }
  std::vector<CopyItem> items{{static_cast<off_t>(src_pos), static_cast<off_t>(dst_pos), buf.data + off,
                               static_cast<size_t>(len)}};
  PromiseWorker* w = new CopyWorker(env, src, dst, std::move(items));
  if (!env.IsExceptionPending()) w->Keep(0, info[4].As<Napi::Object>());
  return StartWorker(env, w);
}

// copyRanges(srcFd, dstFd, buf, ranges) -> Promise<number>: ranges is a Float64Array of
// [bufOffset, length, srcPosition, dstPosition] quadruples; each range is read from srcFd into
// buf[bufOffset..] and then written to dstFd, all in one threadpool job (CopyWorker). Resolves with
// the bytes read over all ranges: their total length, all written; less when a read came up short
// (the job stops there and writes nothing).
Napi::Value CopyRanges(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int src, dst;
  Bytes buf;
  if (!ArgFd(info, 0, &src) || !ArgFd(info, 1, &dst) || !ArgBytes(info, 2, &buf)) return Napi::Value();
  const double* r = nullptr;
  size_t count = 0;
  if (!Float64Elements(env, info[3], &r, &count) || count % 4 != 0) {
    Napi::TypeError::New(env, "expected a Float64Array of [bufOffset, length, srcPosition, dstPosition] quadruples")
        .ThrowAsJavaScriptException();
    return Napi::Value();
  }
  std::vector<CopyItem> items;
  items.reserve(count / 4);
  for (size_t i = 0; i < count; i += 4) {
    double off = r[i], len = r[i + 1], src_pos = r[i + 2], dst_pos = r[i + 3];
    bool whole = std::trunc(off) == off && std::trunc(len) == len && std::trunc(src_pos) == src_pos &&
                 std::trunc(dst_pos) == dst_pos;
    if (!whole || !(off >= 0) || !(len >= 0) || off + len > static_cast<double>(buf.length) ||
        !(src_pos >= 0) || src_pos + len > kMaxSafeInteger || !(dst_pos >= 0) || dst_pos + len > kMaxSafeInteger) {
      Napi::RangeError::New(env, "range out of bounds").ThrowAsJavaScriptException();
      return Napi::Value();
    }
    items.push_back({static_cast<off_t>(src_pos), static_cast<off_t>(dst_pos), buf.data + static_cast<size_t>(off),
                     static_cast<size_t>(len)});
  }
  PromiseWorker* w = new CopyWorker(env, src, dst, std::move(items));
  if (!env.IsExceptionPending()) w->Keep(0, info[2].As<Napi::Object>());
  return StartWorker(env, w);
}

// copyStream(srcFd, srcPosition, dstFd, dstPosition, buf, bufOffset, pieceLength, length, sequential)
// -> Promise<number>: copies `length` bytes of srcFd at srcPosition to dstFd at dstPosition through
// buf[bufOffset, bufOffset + pieceLength), one piece after the other, in one threadpool job
// (StreamCopyWorker). Resolves with the bytes copied: `length`, or fewer when srcFd ended early
// (the pieces before the short one are written, the short one is not).
Napi::Value CopyStream(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int src, dst;
  int64_t src_pos, dst_pos, off, piece, len;
  Bytes buf;
  if (!ArgFd(info, 0, &src) || !ArgInt64(info, 1, &src_pos) || !ArgFd(info, 2, &dst) ||
      !ArgInt64(info, 3, &dst_pos) || !ArgBytes(info, 4, &buf) || !ArgInt64(info, 5, &off) ||
      !ArgInt64(info, 6, &piece) || !ArgInt64(info, 7, &len) || !CheckSlice(env, buf, off, piece)) {
    return Napi::Value();
  }
  if (src_pos < 0 || dst_pos < 0 || len < 0 || static_cast<double>(src_pos) + static_cast<double>(len) > kMaxSafeInteger ||
      static_cast<double>(dst_pos) + static_cast<double>(len) > kMaxSafeInteger) {
    Napi::RangeError::New(env, "position out of range").ThrowAsJavaScriptException();
    return Napi::Value();
  }
  if (piece <= 0 && len > 0) {
    Napi::RangeError::New(env, "the piece must be at least one byte").ThrowAsJavaScriptException();
    return Napi::Value();
  }
  bool sequential = info.Length() > 8 && info[8].ToBoolean().Value();
  PromiseWorker* w = new StreamCopyWorker(env, src, static_cast<off_t>(src_pos), dst, static_cast<off_t>(dst_pos),
                                          buf.data + off, static_cast<size_t>(piece), static_cast<size_t>(len), sequential);
  if (!env.IsExceptionPending()) w->Keep(0, info[4].As<Napi::Object>());
  return StartWorker(env, w);
}

Napi::Value Fdatasync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!ArgFd(info, 0, &fd)) return Napi::Value();
  return StartWorker(env, new FdatasyncWorker(env, fd));
}

// fallocate(fd, offset, length, mode) -> Promise<void>. mode: 0, or FALLOC_FL_* bits (the JS
// side allows only KEEP_SIZE, PUNCH_HOLE with KEEP_SIZE, and ZERO_RANGE).
Napi::Value Fallocate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  int64_t offset, length, mode;
  if (!ArgFd(info, 0, &fd) || !ArgInt64(info, 1, &offset) ||
      !ArgInt64(info, 2, &length) || !ArgInt64(info, 3, &mode)) {
    return Napi::Value();
  }
  return StartWorker(env, new FallocateWorker(env, fd, static_cast<int>(mode),
                                              static_cast<off_t>(offset),
                                              static_cast<off_t>(length)));
}

// seekData(fd, offset, hole) -> number: lseek(SEEK_DATA), or SEEK_HOLE when `hole`. Returns the
// offset found, or -1 when there is no data at or after `offset` (ENXIO). Synchronous: it answers
// from the filesystem's extent tree in memory (and is used only at open and in recovery).
Napi::Value SeekData(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  int64_t offset;
  if (!ArgFd(info, 0, &fd) || !ArgInt64(info, 1, &offset)) return Napi::Value();
  bool hole = info.Length() > 2 && info[2].ToBoolean().Value();
  off_t r = ::lseek(fd, static_cast<off_t>(offset), hole ? SEEK_HOLE : SEEK_DATA);
  if (r < 0) {
    if (errno == ENXIO) return Napi::Number::New(env, -1);
    ThrowErrno(env, errno, "lseek");
    return Napi::Value();
  }
  return Napi::Number::New(env, static_cast<double>(r));
}

// preadNowait(fd, buf, bufOffset, length, position) -> number
// preadv2(RWF_NOWAIT) on the calling (event loop) thread: copies what the page cache holds and
// never waits for the disk. A cache hit then costs no trip to the threadpool and back. Returns
// the bytes read (maybe short, 0 at EOF), or -1 when the first page is not cached or the file
// system cannot do RWF_NOWAIT: the caller reads the rest with pread().
Napi::Value PreadNowait(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  TransferArgs a;
  if (!ArgTransfer(info, &a)) return Napi::Value();
  struct iovec iov = {a.data, a.length};
  ssize_t n;
  do {
    n = preadv2(a.fd, &iov, 1, a.pos, RWF_NOWAIT);
  } while (n < 0 && errno == EINTR);
  if (n >= 0) return Napi::Number::New(env, static_cast<double>(n));
  if (errno == EAGAIN || errno == EOPNOTSUPP || errno == EINVAL || errno == ENOSYS) {
    return Napi::Number::New(env, -1);
  }
  ThrowErrno(env, errno, "preadv2");
  return Napi::Value();
}

void FreeAligned(napi_env, void* data, void*) { free(data); }

// alignedBuffer(size, alignment) -> Buffer; the GC frees the memory.
Napi::Value AlignedBuffer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int64_t size, alignment;
  if (!ArgInt64(info, 0, &size) || !ArgInt64(info, 1, &alignment)) {
    return Napi::Value();
  }
  if (alignment < static_cast<int64_t>(sizeof(void*)) ||
      (alignment & (alignment - 1)) != 0) {
    Napi::RangeError::New(env, "alignment must be a power of two")
        .ThrowAsJavaScriptException();
    return Napi::Value();
  }
  void* data = nullptr;
  // A zero-byte request still gets a real (unused) allocation so the free in
  // the finalizer is unconditional.
  size_t bytes = size > 0 ? static_cast<size_t>(size) : 1;
  int rc = posix_memalign(&data, static_cast<size_t>(alignment), bytes);
  if (rc != 0) {
    ThrowErrno(env, rc, "posix_memalign");
    return Napi::Value();
  }
  memset(data, 0, bytes);
  napi_value result;
  napi_status status = napi_create_external_buffer(
      env, static_cast<size_t>(size), data, FreeAligned, nullptr, &result);
  if (status != napi_ok) {
    free(data);  // the finalizer was not attached
    if (!env.IsExceptionPending()) {
      Napi::Error::New(env, "napi_create_external_buffer failed")
          .ThrowAsJavaScriptException();
    }
    return Napi::Value();
  }
  return Napi::Value(env, result);
}

}  // namespace

bool InitIo(Napi::Env env, Napi::Object exports) {
  exports.Set("FALLOC_FL_KEEP_SIZE", Napi::Number::New(env, FALLOC_FL_KEEP_SIZE));
  exports.Set("FALLOC_FL_PUNCH_HOLE", Napi::Number::New(env, FALLOC_FL_PUNCH_HOLE));
  exports.Set("FALLOC_FL_ZERO_RANGE", Napi::Number::New(env, FALLOC_FL_ZERO_RANGE));
  if (env.IsExceptionPending()) return false;
  return Export<Transfer<false>>(env, exports, "pread") &&
         Export<PreadNowait>(env, exports, "preadNowait") &&
         Export<Transfer<true>>(env, exports, "pwrite") &&
         Export<PwriteList>(env, exports, "pwriteList") &&
         Export<CopyRange>(env, exports, "copyRange") &&
         Export<CopyRanges>(env, exports, "copyRanges") &&
         Export<CopyStream>(env, exports, "copyStream") &&
         Export<Fdatasync>(env, exports, "fdatasync") &&
         Export<Fallocate>(env, exports, "fallocate") &&
         Export<SeekData>(env, exports, "seekData") &&
         Export<AlignedBuffer>(env, exports, "alignedBuffer");
}

}  // namespace ulob
