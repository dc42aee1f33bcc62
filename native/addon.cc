// Module init, per-environment state and the errno -> NativeError helper.
#include "addon.h"

#include <uv.h>

#include <cmath>
#include <string>

namespace ulob {

namespace {

// setErrorClass(ctor): src/native/addon.ts hands over its NativeError class once at
// load, so errors thrown from C++ are real instances JS code can `instanceof`.
Napi::Value SetErrorClass(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsFunction()) {
    Napi::TypeError::New(env, "setErrorClass: expected a function")
        .ThrowAsJavaScriptException();
    return Napi::Value();
  }
  Addon* addon = env.GetInstanceData<Addon>();
  addon->error_class = Napi::Persistent(info[0].As<Napi::Function>());
  return env.Undefined();
}

// Sets a property, reporting failure (with a pending exception) as false.
bool SetProp(Napi::Object obj, const char* key, Napi::Value value) {
  if (value.IsEmpty()) return false;
  obj.Set(key, value);
  return !obj.Env().IsExceptionPending();
}

}  // namespace

Napi::Value ErrnoError(Napi::Env env, int err, const char* syscall) {
  // The _r variants: plain uv_err_name() leaks for unknown codes.
  char code[64];
  char desc[256];
  uv_err_name_r(-err, code, sizeof code);
  uv_strerror_r(-err, desc, sizeof desc);
  std::string message = std::string(code) + ": " + desc + ", " + syscall;

  Napi::String js_message = Napi::String::New(env, message);
  Napi::String js_code = Napi::String::New(env, code);
  Napi::Number js_errno = Napi::Number::New(env, err);
  Napi::String js_syscall = Napi::String::New(env, syscall);
  if (env.IsExceptionPending()) return Napi::Value();

  Addon* addon = env.GetInstanceData<Addon>();
  if (addon != nullptr && !addon->error_class.IsEmpty()) {
    Napi::Object e = addon->error_class.New(
        {js_message, js_code, js_errno, js_syscall});
    if (env.IsExceptionPending()) return Napi::Value();
    return e;
  }

  // Only reachable if the raw binding is used without src/native/.
  Napi::Object e = Napi::Error::New(env, message).Value();
  if (env.IsExceptionPending()) return Napi::Value();
  if (!SetProp(e, "code", js_code) || !SetProp(e, "errno", js_errno) ||
      !SetProp(e, "syscall", js_syscall)) {
    return Napi::Value();
  }
  return e;
}

void ThrowErrno(Napi::Env env, int err, const char* syscall) {
  Napi::Value e = ErrnoError(env, err, syscall);
  if (e.IsEmpty()) return;  // exception already pending
  napi_throw(env, e);
}

bool ArgBytes(const Napi::CallbackInfo& info, size_t i, Bytes* out) {
  Napi::Env env = info.Env();
  napi_value v = info[i];
  bool is_typedarray = false;
  if (napi_is_typedarray(env, v, &is_typedarray) != napi_ok || !is_typedarray) {
    Napi::TypeError::New(env, "expected a Uint8Array").ThrowAsJavaScriptException();
    return false;
  }
  napi_typedarray_type type;
  size_t length = 0;
  void* data = nullptr;
  // `data` already points at the view's first byte (ArrayBuffer data plus
  // byteOffset), so subarrays need no further adjustment.
  if (napi_get_typedarray_info(env, v, &type, &length, &data, nullptr, nullptr) !=
          napi_ok ||
      type != napi_uint8_array) {
    Napi::TypeError::New(env, "expected a Uint8Array").ThrowAsJavaScriptException();
    return false;
  }
  out->data = static_cast<uint8_t*>(data);
  out->length = length;
  return true;
}

bool ArgInt64(const Napi::CallbackInfo& info, size_t i, int64_t* out) {
  Napi::Env env = info.Env();
  napi_value v = info[i];
  double d = 0;
  // Read as double first: napi_get_value_int64 would silently truncate
  // fractions and clamp non-finite values.
  if (napi_get_value_double(env, v, &d) != napi_ok || !(d >= 0) ||
      d > kMaxSafeInteger || std::trunc(d) != d) {
    Napi::RangeError::New(env, "expected a non-negative safe integer")
        .ThrowAsJavaScriptException();
    return false;
  }
  *out = static_cast<int64_t>(d);
  return true;
}

bool ArgFd(const Napi::CallbackInfo& info, size_t i, int* out) {
  int64_t fd = 0;
  if (!ArgInt64(info, i, &fd)) return false;
  if (fd > INT32_MAX) {
    Napi::RangeError::New(info.Env(), "fd out of range").ThrowAsJavaScriptException();
    return false;
  }
  *out = static_cast<int>(fd);
  return true;
}

bool Float64Elements(napi_env env, napi_value value, const double** out, size_t* count) {
  bool is_typedarray = false;
  napi_typedarray_type type;
  void* raw = nullptr;
  if (napi_is_typedarray(env, value, &is_typedarray) != napi_ok || !is_typedarray ||
      napi_get_typedarray_info(env, value, &type, count, &raw, nullptr, nullptr) != napi_ok ||
      type != napi_float64_array) {
    return false;
  }
  *out = static_cast<const double*>(raw);
  return true;
}

bool CheckSlice(Napi::Env env, const Bytes& bytes, int64_t offset, int64_t length) {
  // Both are non-negative safe integers, so the sum cannot overflow.
  if (static_cast<uint64_t>(offset) + static_cast<uint64_t>(length) > bytes.length) {
    Napi::RangeError::New(env, "range outside the buffer").ThrowAsJavaScriptException();
    return false;
  }
  return true;
}

}  // namespace ulob

namespace {

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  using namespace ulob;
  Addon* addon = new Addon();
  env.SetInstanceData<Addon>(addon);  // napi deletes it at env teardown
  if (env.IsExceptionPending()) {
    delete addon;
    return Napi::Object();
  }
  if (!Export<SetErrorClass>(env, exports, "setErrorClass") ||
      !InitIo(env, exports) || !InitBlkdev(env, exports) ||
      !InitBitmap(env, exports) || !InitProcess(env, exports) ||
      !InitPower(env, exports) || !InitUloop(env, exports) ||
      !InitUblk(env, exports)) {
    return Napi::Object();
  }
  return exports;
}

}  // namespace

NODE_API_MODULE(ulob_native, Init)
