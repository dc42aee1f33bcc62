// Disk power commands: ATA commands sent through SG_IO (SCSI ATA PASS-THROUGH, as SAT bridges
// and libata take them) or, as a fallback, the legacy HDIO_DRIVE_CMD ioctl. Mechanism only: the
// CDB and taskfile are built and decoded in src/writeback/power.ts; here they are sent. Both run
// on the libuv threadpool: STANDBY IMMEDIATE waits for the platters to stop.
#include <errno.h>
#include <linux/hdreg.h>
#include <scsi/sg.h>
#include <string.h>
#include <sys/ioctl.h>

#include "addon.h"

namespace ulob {

namespace {

class SgIoWorker : public PromiseWorker {
 public:
  SgIoWorker(Napi::Env env, int fd, const Bytes& cdb, const Bytes& sense, unsigned timeout_ms)
      : PromiseWorker(env, "ulob:sgio", "ioctl(SG_IO)"), fd_(fd), cdb_(cdb), sense_(sense), timeout_ms_(timeout_ms) {}

  void Execute() override {
    sg_io_hdr_t io;
    memset(&io, 0, sizeof io);
    io.interface_id = 'S';
    io.dxfer_direction = SG_DXFER_NONE;  // non-data commands only
    io.cmd_len = static_cast<unsigned char>(cdb_.length);
    io.cmdp = cdb_.data;
    io.mx_sb_len = static_cast<unsigned char>(sense_.length);
    io.sbp = sense_.data;
    io.timeout = timeout_ms_;
    for (;;) {
      if (ioctl(fd_, SG_IO, &io) == 0) break;
      if (errno == EINTR) continue;
      err_ = errno;
      return;
    }
    status_ = io.status;
    host_ = io.host_status;
    driver_ = io.driver_status;
    sense_len_ = io.sb_len_wr;
  }

  Napi::Value Result(Napi::Env env) override {
    Napi::Object r = Napi::Object::New(env);
    r.Set("status", Napi::Number::New(env, status_));
    r.Set("hostStatus", Napi::Number::New(env, host_));
    r.Set("driverStatus", Napi::Number::New(env, driver_));
    r.Set("senseLength", Napi::Number::New(env, sense_len_));
    if (env.IsExceptionPending()) return Napi::Value();
    return r;
  }

 private:
  int fd_;
  Bytes cdb_;
  Bytes sense_;
  unsigned timeout_ms_;
  int status_ = 0, host_ = 0, driver_ = 0, sense_len_ = 0;
};

class DriveCmdWorker : public PromiseWorker {
 public:
  DriveCmdWorker(Napi::Env env, int fd, const Bytes& args)
      : PromiseWorker(env, "ulob:hdio", "ioctl(HDIO_DRIVE_CMD)"), fd_(fd), args_(args) {}

  void Execute() override {
    for (;;) {
      if (ioctl(fd_, HDIO_DRIVE_CMD, args_.data) == 0) return;
      if (errno == EINTR) continue;
      err_ = errno;
      return;
    }
  }

 private:
  int fd_;
  Bytes args_;
};

// ataSgIo(fd, cdb: Uint8Array(16), sense: Uint8Array(32), timeoutMs) -> Promise<{status,
// hostStatus, driverStatus, senseLength}>; sense is filled in place.
Napi::Value AtaSgIo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  Bytes cdb, sense;
  int64_t timeout = 0;
  if (!ArgFd(info, 0, &fd) || !ArgBytes(info, 1, &cdb) || !ArgBytes(info, 2, &sense) || !ArgInt64(info, 3, &timeout)) {
    return Napi::Value();
  }
  if (cdb.length < 6 || cdb.length > 16 || sense.length < 18 || sense.length > 255 || timeout > 3600000) {
    Napi::RangeError::New(env, "ataSgIo: bad cdb, sense or timeout").ThrowAsJavaScriptException();
    return Napi::Value();
  }
  auto* w = new SgIoWorker(env, fd, cdb, sense, static_cast<unsigned>(timeout));
  w->Keep(0, info[1].As<Napi::Object>());
  w->Keep(1, info[2].As<Napi::Object>());
  return StartWorker(env, w);
}

// hdioDriveCmd(fd, args: Uint8Array(4 + 512 * args[3]) = [command, count, feature, sectors, data])
// -> Promise<void>; the kernel writes [status, error, count, ...] and `sectors` sectors of data
// back into args.
Napi::Value HdioDriveCmd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  Bytes args;
  if (!ArgFd(info, 0, &fd) || !ArgBytes(info, 1, &args)) return Napi::Value();
  // The kernel copies 512 bytes per sector of args[3] (a data-in command's sector count) back
  // after the 4 header bytes: the buffer must hold them all, or it writes past its end.
  if (args.length < 4 || args.length < 4 + 512 * static_cast<size_t>(args.data[3])) {
    Napi::RangeError::New(env, "hdioDriveCmd: args must hold 4 + 512 * args[3] bytes").ThrowAsJavaScriptException();
    return Napi::Value();
  }
  auto* w = new DriveCmdWorker(env, fd, args);
  w->Keep(0, info[1].As<Napi::Object>());
  return StartWorker(env, w);
}

}  // namespace

bool InitPower(Napi::Env env, Napi::Object exports) {
  return Export<AtaSgIo>(env, exports, "ataSgIo") && Export<HdioDriveCmd>(env, exports, "hdioDriveCmd");
}

}  // namespace ulob
