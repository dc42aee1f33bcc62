// Shared declarations of the ulob_native addon.
//
// The addon is mechanism only: every argument has already been validated by
// src/native/*.ts. The C++ side re-checks types and bounds only so that a
// direct call into the raw binding cannot corrupt memory; those checks throw
// plain TypeError/RangeError with terse messages.
#pragma once

#include <napi.h>

#include <cstddef>
#include <cstdint>

namespace ulob {

// Per-environment state (napi instance data), one per main thread / worker.
// Owned by the env: created in Init, deleted by napi when the env tears down.
struct Addon {
  // JS class NativeError from src/native/addon.ts, set once via setErrorClass().
  // Constructed as new NativeError(message, code, errno, syscall).
  Napi::FunctionReference error_class;
};

// A validated byte range inside a Uint8Array (data already includes the
// view's byteOffset, as napi_get_typedarray_info reports it).
struct Bytes {
  uint8_t* data;
  size_t length;
};

// Builds a NativeError for a positive errno. Returns an empty value if even
// that failed (an exception is then pending).
Napi::Value ErrnoError(Napi::Env env, int err, const char* syscall);
// Throws ErrnoError(...) as a pending exception.
void ThrowErrno(Napi::Env env, int err, const char* syscall);

// Base of every async syscall: runs Execute() on libuv's threadpool, settles one promise, and
// keeps the caller's buffers (up to two) alive until the thread is done with their bytes.
// Owner: AsyncWorker deletes itself after OnOK; on a failed Queue, StartWorker deletes it.
class PromiseWorker : public Napi::AsyncWorker {
 public:
  PromiseWorker(Napi::Env env, const char* name, const char* syscall)
      : Napi::AsyncWorker(env, name), syscall_(syscall), deferred_(Napi::Promise::Deferred::New(env)) {}

  void Keep(size_t i, Napi::Object buffer) { keep_[i] = Napi::Persistent(buffer); }
  Napi::Promise Promise() const { return deferred_.Promise(); }

 protected:
  virtual Napi::Value Result(Napi::Env env) { return env.Undefined(); }

  void OnOK() override {
    Napi::Env env = Env();
    if (err_ != 0) {
      Napi::Value e = ErrnoError(env, err_, syscall_);
      if (e.IsEmpty()) return;
      deferred_.Reject(e);
      return;
    }
    Napi::Value result = Result(env);
    if (result.IsEmpty()) return;
    deferred_.Resolve(result);
  }

  int err_ = 0;  // positive errno, set by Execute() on the worker thread
  const char* syscall_;  // what failed, for the error's message (Execute may name the step)

 private:
  Napi::Promise::Deferred deferred_;
  Napi::ObjectReference keep_[2];
};

// Queues `w` and returns its promise, or an empty value (pending exception).
inline Napi::Value StartWorker(Napi::Env env, PromiseWorker* w) {
  if (env.IsExceptionPending()) {  // the constructor failed
    delete w;
    return Napi::Value();
  }
  Napi::Promise promise = w->Promise();
  w->Queue();
  if (env.IsExceptionPending()) {
    delete w;
    return Napi::Value();
  }
  return promise;
}

// Number.MAX_SAFE_INTEGER: the largest byte count or position a JS number carries exactly.
constexpr double kMaxSafeInteger = 9007199254740991.0;

// Argument readers: each returns false with a pending exception on failure.
bool ArgBytes(const Napi::CallbackInfo& info, size_t i, Bytes* out);
bool ArgInt64(const Napi::CallbackInfo& info, size_t i, int64_t* out);
bool ArgFd(const Napi::CallbackInfo& info, size_t i, int* out);
// The elements of `value` if it is a Float64Array; false (no exception: the caller names what it
// expected) otherwise.
bool Float64Elements(napi_env env, napi_value value, const double** out, size_t* count);
// Checks [offset, offset + length) lies within `bytes`.
bool CheckSlice(Napi::Env env, const Bytes& bytes, int64_t offset, int64_t length);

// One registration function per concern (native/<concern>.cc).
bool InitIo(Napi::Env env, Napi::Object exports);
bool InitBlkdev(Napi::Env env, Napi::Object exports);
bool InitBitmap(Napi::Env env, Napi::Object exports);
bool InitProcess(Napi::Env env, Napi::Object exports);
bool InitUloop(Napi::Env env, Napi::Object exports);
bool InitPower(Napi::Env env, Napi::Object exports);
bool InitUblk(Napi::Env env, Napi::Object exports);

// Registers `cb` as exports[name]; false with a pending exception on failure.
template <Napi::Function::Callback cb>
inline bool Export(Napi::Env env, Napi::Object exports, const char* name) {
  Napi::Function fn = Napi::Function::New<cb>(env, name);
  if (env.IsExceptionPending()) return false;
  exports.Set(name, fn);
  return !env.IsExceptionPending();
}

}  // namespace ulob
