// A ublk server (the kernel's ublk_drv, Documentation/block/ublk.rst): /dev/ublkbN served by one
// queue thread driving its own io_uring (raw syscalls, 128-byte SQEs, IORING_OP_URING_CMD) on
// /dev/ublkcN. The thread serves hits itself, straight from and to the cache file (reads of present
// blocks, writes into dirty blocks, FLUSH as fdatasync of the cache file); what needs the daemon's
// store goes to JS as an upcall through a ThreadSafeFunction, as uloop.ko's messages do (a MISS
// fills blocks, an INTENT makes them durably dirty, a PRESERVE keeps a flush epoch's version) and
// the request waits for the reply. The block state it serves from (present, dirty, the epoch's
// snapshot) mirrors what uloop.ko keeps; the JS side hands it the store's bitmaps at start.
//
// Control commands go through a second ring on /dev/ublk-control and block (START_DEV waits for
// the queue's fetches and scans partitions through it, STOP_DEV waits for I/O in flight): they run
// on libuv's threadpool so misses can still reach JS meanwhile.
#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <linux/ublk_cmd.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "addon.h"

namespace ulob {

namespace {

// ioctl-encoded command opcodes (ublk_cmd.h of 6.5+; Debian 12's header predates them). The
// driver dispatches on _IOC_NR except GET_FEATURES, which it compares whole.
constexpr uint32_t kCmdGetDevInfo = _IOR('u', 0x02, struct ublksrv_ctrl_cmd);
constexpr uint32_t kCmdAddDev = _IOWR('u', 0x04, struct ublksrv_ctrl_cmd);
constexpr uint32_t kCmdDelDev = _IOWR('u', 0x05, struct ublksrv_ctrl_cmd);
constexpr uint32_t kCmdStartDev = _IOWR('u', 0x06, struct ublksrv_ctrl_cmd);
constexpr uint32_t kCmdStopDev = _IOWR('u', 0x07, struct ublksrv_ctrl_cmd);
constexpr uint32_t kCmdSetParams = _IOWR('u', 0x08, struct ublksrv_ctrl_cmd);
constexpr uint32_t kCmdGetParams = _IOR('u', 0x09, struct ublksrv_ctrl_cmd);
constexpr uint32_t kCmdStartRecovery = _IOWR('u', 0x10, struct ublksrv_ctrl_cmd);
constexpr uint32_t kCmdEndRecovery = _IOWR('u', 0x11, struct ublksrv_ctrl_cmd);
constexpr uint32_t kCmdGetFeatures = _IOR('u', 0x13, struct ublksrv_ctrl_cmd);
constexpr uint32_t kCmdDelDevAsync = _IOR('u', 0x14, struct ublksrv_ctrl_cmd);  // 6.9+: EOPNOTSUPP before
constexpr uint32_t kIoFetch = _IOWR('u', 0x20, struct ublksrv_io_cmd);
constexpr uint32_t kIoCommitFetch = _IOWR('u', 0x21, struct ublksrv_io_cmd);

constexpr uint64_t kFUserRecovery = 1ULL << 3;
constexpr uint64_t kFUserRecoveryReissue = 1ULL << 4;
constexpr uint64_t kFCmdIoctlEncode = 1ULL << 6;
constexpr uint64_t kFUserCopy = 1ULL << 7;     // 6.5+: the request's data read and written through /dev/ublkcN
constexpr uint64_t kFAutoBufReg = 1ULL << 11;  // 6.16+: the request's pages are a fixed buffer of the queue's ring
constexpr uint64_t kFZeroCopyPath = kFUserCopy | kFAutoBufReg;
// USER_COPY: a request's data is at this offset of /dev/ublkcN (ublk_cmd.h of 6.5+: the queue's
// id from bit 41, the tag's from bit 25, the byte within the request below).
constexpr uint64_t kUserCopyBase = 0x80000000ULL;
constexpr unsigned kUserCopyTagShift = 25, kUserCopyQueueShift = 41;

constexpr uint8_t kOpRead = 0, kOpWrite = 1, kOpFlush = 2, kOpDiscard = 3, kOpWriteZeroes = 5;
constexpr uint32_t kIoFFua = 1U << 13;  // UBLK_IO_F_FUA, in op_flags >> 8 terms: bit 13 of op_flags
constexpr int kStateLive = 1, kStateQuiesced = 2;

// IORING_FEAT_MIN_TIMEOUT (6.12+; the build root's header may predate it): io_uring_enter takes
// struct io_uring_getevents_arg's min_wait_usec.
constexpr unsigned kFeatMinTimeout = 1U << 15;

constexpr uint64_t kEventData = ~0ULL;        // user_data of the eventfd read
constexpr uint64_t kReadData = 1ULL << 32;  // user_data of a read of the cache file: this bit | the tag

// ---- a minimal io_uring (128-byte SQEs) ----
struct Ring {
  int fd = -1;
  unsigned entries = 0;
  void* sq_ptr = nullptr;
  size_t sq_len = 0;
  void* cq_ptr = nullptr;
  size_t cq_len = 0;
  uint8_t* sqes = nullptr;
  size_t sqes_len = 0;
  unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
  unsigned *cq_head, *cq_tail, *cq_mask;
  struct io_uring_cqe* cqes;
  unsigned to_submit = 0;
  unsigned flags = 0;     // the setup flags the kernel took
  unsigned features = 0;  // io_uring_params.features: what this kernel's io_uring can do (IORING_FEAT_*)

  // `extra`: setup flags beyond SQE128 that the ring can do without: a kernel that refuses them
  // (EINVAL: older than the flag) gets a ring without them (`flags` says which).
  int Init(unsigned n, unsigned extra = 0) {
    struct io_uring_params p = {};
    p.flags = IORING_SETUP_SQE128 | extra;
    fd = static_cast<int>(syscall(__NR_io_uring_setup, n, &p));
    if (fd < 0 && errno == EINVAL && extra) {
      p = {};
      p.flags = IORING_SETUP_SQE128;
      fd = static_cast<int>(syscall(__NR_io_uring_setup, n, &p));
    }
    if (fd < 0) return errno;
    flags = p.flags;
    features = p.features;
    entries = p.sq_entries;
    sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    bool single = p.features & IORING_FEAT_SINGLE_MMAP;
    if (single && cq_len > sq_len) sq_len = cq_len;
    sq_ptr = mmap(nullptr, sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
    if (sq_ptr == MAP_FAILED) return Fail();
    if (single) {
      cq_ptr = sq_ptr;
    } else {
      cq_ptr = mmap(nullptr, cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_CQ_RING);
      if (cq_ptr == MAP_FAILED) return Fail();
    }
    sqes_len = p.sq_entries * 128;
    void* s = mmap(nullptr, sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
    if (s == MAP_FAILED) return Fail();
    sqes = static_cast<uint8_t*>(s);
    auto at = [](void* base, unsigned off) { return reinterpret_cast<unsigned*>(static_cast<uint8_t*>(base) + off); };
    sq_head = at(sq_ptr, p.sq_off.head);
    sq_tail = at(sq_ptr, p.sq_off.tail);
    sq_mask = at(sq_ptr, p.sq_off.ring_mask);
    sq_array = at(sq_ptr, p.sq_off.array);
    cq_head = at(cq_ptr, p.cq_off.head);
    cq_tail = at(cq_ptr, p.cq_off.tail);
    cq_mask = at(cq_ptr, p.cq_off.ring_mask);
    cqes = reinterpret_cast<struct io_uring_cqe*>(static_cast<uint8_t*>(cq_ptr) + p.cq_off.cqes);
    return 0;
  }

  int Fail() {
    int e = errno;
    Close();
    return e;
  }

  void Close() {
    if (sqes && sqes != MAP_FAILED) munmap(sqes, sqes_len);
    if (cq_ptr && cq_ptr != MAP_FAILED && cq_ptr != sq_ptr) munmap(cq_ptr, cq_len);
    if (sq_ptr && sq_ptr != MAP_FAILED) munmap(sq_ptr, sq_len);
    sqes = nullptr;
    cq_ptr = sq_ptr = nullptr;
    if (fd >= 0) close(fd);
    fd = -1;
  }

  // A zeroed SQE, or null when the ring is full (submit first).
  struct io_uring_sqe* Get() {
    unsigned tail = *sq_tail;
    unsigned head = __atomic_load_n(sq_head, __ATOMIC_ACQUIRE);
    if (tail - head >= entries) return nullptr;
    unsigned i = tail & *sq_mask;
    auto* sqe = reinterpret_cast<struct io_uring_sqe*>(sqes + 128 * i);
    memset(sqe, 0, 128);
    sq_array[i] = i;
    __atomic_store_n(sq_tail, tail + 1, __ATOMIC_RELEASE);
    to_submit++;
    return sqe;
  }

  // Submits what was queued (at most `limit` SQEs: a test hook's partial submission) and waits
  // for at least `wait` completions; 0 or a positive errno. The kernel may take fewer than asked
  // (it stops at a failed request allocation): the rest stays queued (`to_submit`).
  int Enter(unsigned wait, unsigned limit = ~0u) {
    for (;;) {
      long r = syscall(__NR_io_uring_enter, fd, to_submit < limit ? to_submit : limit, wait, wait ? IORING_ENTER_GETEVENTS : 0, nullptr, 0);
      if (r >= 0) {
        to_submit -= static_cast<unsigned>(r) < to_submit ? static_cast<unsigned>(r) : to_submit;
        return 0;
      }
      if (errno == EINTR) continue;
      return errno;
    }
  }

  // Enter(wait) with a bound on the wait (a batched wait): submits what was queued, then returns
  // once `wait` completions are there or, after `min_wait_us` µs, with whatever has completed
  // (none: the caller's next wait should be an unbounded Enter(1), not this again). Needs
  // IORING_FEAT_MIN_TIMEOUT (Linux 6.12+: struct io_uring_getevents_arg's min_wait_usec, which
  // older kernels call `pad` and refuse when it is not 0). No general timeout is passed, so the
  // kernel returns at min_wait_us whether or not anything completed: the bound holds on every
  // 6.12+ kernel, including those whose switch to the general timeout still waited for `wait`
  // completions (fixed in 6.19 and -stable, liburing issue 1477). 0 or a positive errno; ETIME
  // (the bound, nothing completed) is 0.
  int EnterBounded(unsigned wait, uint32_t min_wait_us) {
    struct {  // struct io_uring_getevents_arg of 6.12+ (the build root's header may predate min_wait_usec)
      uint64_t sigmask;
      uint32_t sigmask_sz;
      uint32_t min_wait_usec;
      uint64_t ts;
    } arg = {0, 0, min_wait_us, 0};
    static_assert(sizeof(arg) == 24, "struct io_uring_getevents_arg is 24 bytes");
    for (;;) {
      long r = syscall(__NR_io_uring_enter, fd, to_submit, wait, IORING_ENTER_GETEVENTS | IORING_ENTER_EXT_ARG, &arg, sizeof(arg));
      if (r >= 0) {
        to_submit -= static_cast<unsigned>(r) < to_submit ? static_cast<unsigned>(r) : to_submit;
        return 0;
      }
      if (errno == EINTR) continue;
      if (errno == ETIME) return 0;  // nothing to submit and nothing completed within the bound
      return errno;
    }
  }

  template <typename F>
  unsigned Reap(F&& f) {
    unsigned head = *cq_head, n = 0;
    unsigned tail = __atomic_load_n(cq_tail, __ATOMIC_ACQUIRE);
    for (; head != tail; head++, n++) f(cqes[head & *cq_mask]);
    __atomic_store_n(cq_head, head, __ATOMIC_RELEASE);
    return n;
  }
};

// One control command on its own short-lived ring: result (>= 0) or a negative errno.
int CtrlCmd(int ctrl_fd, uint32_t op, uint32_t dev_id, uint16_t queue_id, void* addr, uint16_t len, uint64_t data0) {
  Ring r;
  int e = r.Init(4);
  if (e) return -e;
  auto* sqe = r.Get();
  sqe->opcode = IORING_OP_URING_CMD;
  sqe->fd = ctrl_fd;
  sqe->cmd_op = op;
  auto* c = reinterpret_cast<struct ublksrv_ctrl_cmd*>(sqe->cmd);
  c->dev_id = dev_id;
  c->queue_id = queue_id;
  c->addr = reinterpret_cast<uintptr_t>(addr);
  c->len = len;
  c->data[0] = data0;
  e = r.Enter(1);
  int res = -EIO;
  if (e) res = -e;
  else r.Reap([&](const struct io_uring_cqe& cqe) { res = cqe.res; });
  r.Close();
  return res;
}

// ---- bitmaps (one bit per block, 64-bit words) ----
using Bits = std::vector<uint64_t>;
inline bool Test(const Bits& b, uint64_t i) { return (b[i >> 6] >> (i & 63)) & 1; }
inline void Set(Bits& b, uint64_t i) { b[i >> 6] |= 1ULL << (i & 63); }
inline void Clear(Bits& b, uint64_t i) { b[i >> 6] &= ~(1ULL << (i & 63)); }
bool AllSet(const Bits& b, uint64_t first, uint64_t end) {
  for (uint64_t i = first; i < end; i++)
    if (!Test(b, i)) return false;
  return true;
}
// The store's bitmaps are bytes with the first block in the lowest bit: on a little-endian host
// the same bits as our 64-bit words, so they convert with memcpy (no per-bit pass over a 16 TiB disk).
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "bitmap words are the store's bytes only on little-endian hosts");
void FromBytes(Bits& b, const uint8_t* p, size_t n, uint64_t blocks) {
  b.assign((blocks + 63) / 64, 0);
  memcpy(b.data(), p, std::min<size_t>(n, b.size() * 8));
  if (blocks & 63) b.back() &= (1ULL << (blocks & 63)) - 1;  // nothing past the last block
}
// Word w of a store bitmap of n bytes (bytes past its end read as zeros), and the store back.
uint64_t LoadWord(const uint8_t* p, size_t n, uint64_t w) {
  uint64_t v = 0;
  if (w * 8 < n) memcpy(&v, p + w * 8, std::min<size_t>(8, n - w * 8));
  return v;
}
void StoreWord(uint8_t* p, size_t n, uint64_t w, uint64_t v) {
  if (w * 8 < n) memcpy(p + w * 8, &v, std::min<size_t>(8, n - w * 8));
}

// Upcall types, as src/bdev/ublk.ts names them for UpcallHandler.
// kUpRoom (a cache budget only): a write is about to put data into `length / block size` blocks
// the cache does not hold (written whole while missing) past the credit: room for them first.
enum : uint8_t { kUpMiss = 0, kUpIntent = 1, kUpPreserve = 2, kUpRoom = 3 };

struct UpcallMsg {
  uint32_t id;
  uint8_t type;
  uint64_t offset, length, epoch;
};

// Steps of a request that needs the daemon (see Advance).
enum Step : uint8_t { kReadMiss, kReadDone, kWHead, kWTail, kWWhole, kWPreserve, kWPreserved, kWIntent, kWIntented, kWWrite };

struct Tag {
  uint8_t op = 0;
  bool fua = false;
  uint64_t off = 0, len = 0, first = 0, end = 0;
  Step step = kReadMiss;
  uint16_t seq = 0;
  bool waiting = false;  // an upcall is out
  bool holds = false;    // holds busy on [first, end) (Server::held)
  uint64_t up_epoch = 0;
  uint8_t up_type = 0;               // the upcall out: its type and blocks [up_first, up_end)
  uint64_t up_first = 0, up_end = 0;
  uint64_t read_done = 0;  // zero-copy read: bytes READ_FIXED has put into the request so far
  // A budget: a hit read counted in its queue's hit_reads[read_phase] (an eviction waits for it).
  bool hit_counted = false;
  uint8_t read_phase = 0;
  // A budget: blocks this write put into the cache file while missing and counted in `unasked`
  // until its INTENT is answered; `granted`: a ROOM for them was answered.
  uint64_t unasked = 0;
  bool granted = false;
  uint64_t room = 0;  // the blocks its ROOM asked for (the daemon's Grant counted them already)
};

// Hit reads in flight of one queue, by the eviction phase they began in (Server::Evict): written
// by the queue thread, read by the evicting thread. One cache line per queue.
struct alignas(64) HitReads {
  std::atomic<uint32_t> n[2] = {0, 0};
};

struct Counters {
  std::atomic<uint64_t> read_hits{0}, read_misses{0}, write_hits{0}, write_upcalls{0}, flushes{0}, errors{0};
  std::atomic<uint64_t> zero_copy_reads{0};  // reads put into the request's pages by READ_FIXED
};

// An upcall's id: the tag's sequence number (a stale reply is dropped), its queue and the tag.
constexpr unsigned kMaxQueues = 16;
static_assert(kMaxQueues <= 16 && UBLK_MAX_QUEUE_DEPTH <= 4096, "an upcall id has 4 bits of queue and 12 of tag");
inline uint32_t UpcallId(uint16_t seq, uint16_t q, uint16_t tag) { return static_cast<uint32_t>(seq) << 16 | static_cast<uint32_t>(q) << 12 | tag; }

// The touched bitmap is cleared lazily, a chunk at a time: a chunk whose generation is not the
// open epoch reads as zeros, so opening an epoch costs nothing on a 16 TiB disk.
constexpr uint64_t kTouchChunkWords = 1024;  // 65,536 blocks, 8 KiB
// The commit works through the bitmaps in slices, letting go of the lock between them, so that
// I/O never waits for a whole-disk pass (review finding 8).
constexpr uint64_t kCommitSliceWords = 1 << 14;  // 1 Mi blocks, 128 KiB per bitmap

// The queue threads' batched wait ($ULOBDEV_UBLK_BATCH, Server::batch_wait): off (1) by default.
constexpr unsigned kBatchWaitDefault = 1;
constexpr uint32_t kBatchWaitUsDefault = 50;

struct HwQueue;
// The longest an eviction waits for hit reads in flight before it gives up (undone): a read of
// the cache file that takes this long is a sick flash device.
constexpr uint64_t kEvictWaitUs = 60ULL * 1000 * 1000;

class Server {
 public:
  // Set up by Start (worker thread), read-only while the queue threads run.
  int ctrl_fd = -1;
  int cdev_fd = -1;
  int cache_fd = -1;
  int dev_id = -1;
  // This server added the device or took it back: only then may it stop and delete it.
  std::atomic<bool> owned{false};
  uint16_t depth = 32;
  uint16_t nr_queues = 1;  // asked for; Start sets what the driver gave (or the recovered device has)
  uint32_t buf_bytes = 256 << 10;
  uint64_t size = 0;
  uint32_t block_size = 4096;
  uint64_t blocks = 0;
  uint32_t lbs = 512, pbs = 4096;
  bool read_only = false;
  bool recovered = false;
  // The device of this number was left dead or half-recovered: deleted and added again.
  bool replaced = false;
  uint64_t features = 0;
  // The device's data path (set before the queues are made): with UBLK_F_AUTO_BUF_REG and
  // UBLK_F_USER_COPY the driver copies nothing. A request's pages are registered as fixed buffer
  // `tag` of its queue's ring before its FETCH completes (and unregistered by its COMMIT): reads
  // go from the cache file straight into them (IORING_OP_READ_FIXED); a write's data is read
  // from /dev/ublkcN into the tag's buffer (pread, user copy) before it is served as before.
  // Without: the driver copies a write's data into the tag's buffer before the FETCH completes
  // and the buffer into a read's pages at its COMMIT, and reads are pread into the buffer.
  bool zero_copy = false;
  // $ULOBDEV_UBLK_COPY=1 (read at create): a device this daemon adds takes the copy path even
  // where the kernel has zero copy (to compare the two, or to step around a driver bug).
  bool force_copy = false;
  // $ULOBDEV_UBLK_TASKRUN=0 (read at create): the queues' rings without IORING_SETUP_COOP_TASKRUN.
  bool coop_taskrun = true;
  // $ULOBDEV_UBLK_BATCH=K[,US] (read at create): a queue thread that waits for new requests waits
  // for K completions or US µs (default kBatchWaitUsDefault), whichever comes first
  // (HwQueue::Run), where the kernel can bound a wait (IORING_FEAT_MIN_TIMEOUT, 6.12+); 1 (or
  // 0): for one completion, without a bound. A wait that ended on the bound with nothing done is
  // followed by an unbounded one (an idle queue sleeps).
  unsigned batch_wait = kBatchWaitDefault;
  uint32_t batch_wait_us = kBatchWaitUsDefault;
  // One per hardware queue, made by Start and kept until the process exits (replies may name them).
  std::vector<std::unique_ptr<HwQueue>> queues;
  std::atomic<bool> serving{false};  // every queue thread was started
  // START_DEV or END_USER_RECOVERY has returned: until then a queue thread must not end on a
  // failed io_uring_enter, since START_DEV (add_disk's partition scan) may wait for a request only
  // this queue can serve (6.12's END_USER_RECOVERY waits for no request; the flag costs nothing there).
  std::atomic<bool> control_done{false};
  bool start_recovering = false;  // the queues start inside a user recovery (longer start retries)
  Napi::ThreadSafeFunction tsfn;
  std::atomic<bool> stopping{false};
  // The first failed write or fdatasync of the cache file (a positive errno), for good: Linux
  // reports a writeback error once and then calls the lost pages clean, so a later fdatasync that
  // succeeds proves nothing. Writes, FUA and FLUSH fail with EIO from then on; the daemon exits
  // and its restart (the store's dirty set, recorded before every acknowledgement) takes over.
  std::atomic<int> cache_error{0};
  Counters count;
  // Fault injection for the VM test ($ULOBDEV_UBLK_FAULT, read at create): the n-th fdatasync
  // fails with EIO without syncing; io_uring_enter fails with ENOMEM once n requests were served
  // (`served` counts every queue's, so every queue fails at its next Enter), for good or, with
  // enter-enomem-times=k, k times in all; with enter-enomem-at-start=q, every try of queue q's
  // first Enter (its FETCHes) fails (fault_start_queue = q + 1).
  uint64_t fault_fsync_at = 0, fault_enter_at = 0, fault_enter_times = 0;
  unsigned fault_start_queue = 0;
  // recovery-stall-queue=q: inside a user recovery, queue q's thread waits (up to 120 s, or until
  // stopped) before its FETCHes, so that a test can kill -9 the daemon between
  // START_USER_RECOVERY and the last queue's FETCH (fault_stall_queue = q + 1).
  unsigned fault_stall_queue = 0;
  // evict-nowait (a planted bug, for the tests that guard the grace period): an eviction clears
  // present bits but does not wait for hit reads in flight.
  bool fault_evict_nowait = false;
  // no-accessed (a planted bug): hits never set their unit's accessed bit.
  bool fault_no_accessed = false;
  // hit-delay-at=BYTE,hit-delay-ms=MS: the first read hit covering byte BYTE of the device waits
  // MS ms on its queue thread after it was counted and before its read of the cache file is
  // queued, so that a VM test can evict its blocks while it is in flight.
  uint64_t fault_hit_at = ~0ULL, fault_hit_ms = 0;
  std::atomic<bool> fault_hit_done{false};
  // hit-ebadf-at=BYTE: the first read hit covering byte BYTE of the device reads from descriptor
  // -1 (EBADF, a failed read of the cache file): that request fails with the error, committed once.
  uint64_t fault_ebadf_at = ~0ULL;
  std::atomic<bool> fault_ebadf_done{false};
  // ring-einval: the queues' rings are asked for a setup flag no kernel has (EINVAL, as a kernel
  // before 5.19 refuses COOP_TASKRUN): they are made without the optional flags.
  bool fault_ring_einval = false;
  // The cache file's path (for the marker's text) and the durable "recovering" marker
  // (RUN_DIR/ublkbN.recovering; empty: none): see StartWorker_::Recover.
  std::string cache_path, marker;
  std::atomic<uint64_t> syncs{0}, served{0}, enter_faults{0};

  // The start latch: START_DEV and END_USER_RECOVERY wait (uninterruptibly, on a threadpool thread)
  // until every tag of every queue is fetched, so OpenQueues first waits here for each queue
  // thread to say its FETCHes are in (started_ok) or that it failed (start_error, the first errno).
  std::mutex start_mu;
  std::condition_variable start_cv;
  unsigned started_ok = 0;
  int start_error = 0;
  uint16_t start_error_queue = 0;

  // Called once by each queue thread when its FETCHes are submitted (e == 0) or cannot be.
  void QueueStarted(uint16_t q, int e) {
    std::lock_guard<std::mutex> g(start_mu);
    if (e == 0) {
      started_ok++;
    } else if (start_error == 0) {
      start_error = e;
      start_error_queue = q;
    }
    start_cv.notify_all();
  }

  // Block state, shared by the queue threads and the JS thread (epoch calls): under mu. The
  // counts are kept where bits change, so status never scans a bitmap.
  std::mutex mu;
  Bits present, dirty, touched;
  std::vector<uint64_t> touched_gen;  // per kTouchChunkWords of `touched`: the epoch it belongs to
  std::atomic<uint64_t> present_count{0}, dirty_count{0};
  bool epoch_open = false;
  uint64_t epoch = 0;
  // While EpochBegin copies `dirty` out without the lock: the blocks made dirty meanwhile, which
  // the copy may have caught and the epoch must not hold.
  bool copying = false;
  std::vector<std::pair<uint64_t, uint64_t>> late_dirty;
  // Native writes in flight when the epoch opened: they count as written since (the commit keeps
  // their blocks dirty), yet their blocks stay in the snapshot (a later write preserves first).
  std::vector<std::pair<uint64_t, uint64_t>> begin_writing;
  // Test only (ublkTestHook "dirty-mid-copy"): blocks an INTENT reply marks dirty while EpochBegin
  // copies, to pin that interleaving down without a device.
  std::pair<uint64_t, uint64_t> test_mid_copy{0, 0};
  uint8_t test_hit_phase = 0;  // the eviction phase of the last test 'hit'
  // Per (queue, tag), index q * depth + tag: a native write in flight [first, end) (folded into
  // `touched` when an epoch opens), and the blocks a request needing the daemon holds busy (at
  // most one range per tag: a short list, not a bitmap).
  std::vector<std::pair<uint64_t, uint64_t>> writing, held;

  // ---- a cache budget (unitShift given at create; everything below is unused without) ----
  // The mechanism only; the daemon decides (src/bdev/ublk.ts, the engine's clock). `accessed`:
  // one bit per eviction unit (2^unit_shift blocks), set under mu by every hit the queue threads
  // serve (read hits, writes into dirty blocks), taken and cleared by Accessed(). An eviction
  // (Evict) clears present bits under mu, so no new hit starts on those blocks, flips
  // `read_phase`, and waits until no hit read of the old phase is in flight on any queue (a grace
  // period: a hit costs one atomic add and one sub, no lock of its own: it is counted inside the
  // critical section that found its blocks present).
  bool budget = false;
  uint32_t unit_shift = 0;
  Bits accessed;
  // Blocks Evict returned until the daemon says it has punched them (EvictDone): a request on
  // them waits (parks) as behind a held range, so a whole-block write cannot put data there that
  // the punch would then remove (the engine's own eviction lock does the same for its requests).
  Bits evicting;
  uint64_t evicting_count = 0;
  // Per slot (as `held`): a read waiting for its MISS (the sequence number it was sent with, 0:
  // none), and whether an eviction took present blocks of its held range meanwhile (stale: its
  // answer marks nothing present and the read misses again). A read waiting for the daemon would
  // otherwise pin the present blocks of its whole range: concurrent large reads over a small
  // budget pinned every clean block, and the fills failed ('full') with nothing dirty (review9
  // U-A; review8 K2 on uloop). The oldest waiting read keeps its range, so it always completes.
  std::vector<uint64_t> miss_wait;
  std::vector<uint8_t> miss_stale;
  uint64_t miss_seq = 0;
  uint8_t read_phase = 0;
  HitReads hit_reads[kMaxQueues];
  // The credit (as uloop.ko's ULOOP_IOC_CREDIT): blocks written whole while missing and not yet
  // recorded by the store (their INTENT unanswered, or the request failed after writing them:
  // lost until the next attach punches them), plus ROOM grants not yet used, stay within
  // credit_limit; a write that would pass it asks for ROOM first. -1: no limit. Under mu.
  int64_t credit_limit = -1;
  uint64_t unasked = 0;
  std::atomic<uint64_t> evicted{0}, rooms{0};
  // The unit fill (issue 12, power; src/bdev/unit-fill.ts), as uloop.ko's CLAIM/FILLED: the
  // daemon claims missing blocks it will fill from the disk after a MISS. A claimed block is
  // neither present, dirty, held, written nor evicting when claimed, and until FILLED a request
  // touching it parks (Held), an eviction refuses it, and nothing else claims it: no write lands
  // on it before the fill's data, so the fill never overwrites a writer's bytes. FILLED (after
  // the daemon synced the data) makes the blocks it names present and lets the rest go. Under mu.
  struct ClaimRange {
    uint64_t id, first, count;
    Bits bits;  // bit i: block first + i is claimed by this claim
  };
  static constexpr size_t kMaxClaims = 64;
  static constexpr uint64_t kMaxClaimBlocks = 8192;
  std::vector<ClaimRange> claims;
  Bits claimed;  // the union of the claims' bits (a budget: sized as present)
  uint64_t claimed_count = 0, claim_seq = 0;

  ~Server();

  uint64_t BlockEnd(uint64_t off, uint64_t len) const { return (off + len + block_size - 1) / block_size; }
  uint64_t Bytes(uint64_t first, uint64_t end) const {
    uint64_t e = end * block_size;
    return (e > size ? size : e) - first * block_size;
  }

  // ---- block state; every call below is under mu ----
  bool Touched(uint64_t b) const { return touched_gen[(b >> 6) / kTouchChunkWords] == epoch && Test(touched, b); }
  uint64_t TouchedWord(uint64_t w) const { return touched_gen[w / kTouchChunkWords] == epoch ? touched[w] : 0; }
  void Touch(uint64_t first, uint64_t end) {
    for (uint64_t b = first; b < end; b++) {
      uint64_t c = (b >> 6) / kTouchChunkWords;
      if (touched_gen[c] != epoch) {
        uint64_t w0 = c * kTouchChunkWords, n = std::min<uint64_t>(kTouchChunkWords, touched.size() - w0);
        memset(&touched[w0], 0, n * sizeof(uint64_t));
        touched_gen[c] = epoch;
      }
      Set(touched, b);
    }
  }
  // The open epoch's snapshot: blocks dirty at its begin whose version was not preserved yet. A
  // block made dirty since the begin, or written, is touched.
  bool InSnapshot(uint64_t first, uint64_t end) const {
    if (!epoch_open) return false;
    for (uint64_t b = first; b < end; b++)
      if (Test(dirty, b) && !Touched(b)) return true;
    return false;
  }
  void MarkPresent(uint64_t first, uint64_t end) {
    uint64_t n = 0;
    for (uint64_t b = first; b < end; b++)
      if (!Test(present, b)) Set(present, b), n++;
    present_count += n;
  }
  // Only the blocks this call makes dirty are touched and listed as late: a block already dirty
  // when the epoch opened stays in its snapshot until a PRESERVE (an INTENT answered after an
  // epoch opened must not let the write skip it).
  void MarkDirty(uint64_t first, uint64_t end) {
    uint64_t n = 0;
    for (uint64_t b = first; b < end; b++) {
      if (Test(dirty, b)) continue;
      // A relaxed store: EpochBegin may be reading this word outside the lock.
      __atomic_store_n(&dirty[b >> 6], dirty[b >> 6] | 1ULL << (b & 63), __ATOMIC_RELAXED);
      n++;
      if (copying) {
        if (!late_dirty.empty() && late_dirty.back().second == b) late_dirty.back().second = b + 1;
        else late_dirty.emplace_back(b, b + 1);
      }
      if (epoch_open) Touch(b, b + 1);
    }
    dirty_count += n;
  }
  // Is [first, end) present (a read hit)? With a budget the hit is counted on queue q in the
  // eviction phase now (*counted set, *phase), in this critical section that found it present: an
  // eviction clears present bits under the same lock, so it either stops this hit or waits for it
  // (Evict); and its units are marked accessed.
  bool BeginHit(uint16_t q, uint64_t first, uint64_t end, uint8_t* phase, bool* counted) {
    if (!AllSet(present, first, end)) return false;
    if (budget) {
      Access(first, end);
      *phase = read_phase;
      *counted = true;
      hit_reads[q].n[*phase].fetch_add(1, std::memory_order_relaxed);
    }
    return true;
  }
  // The credit step of a write about to put data into the blocks of [first, end) the cache does
  // not hold (a budget): 0 when they fit (or a ROOM for them was answered: `granted`) and are now
  // counted in `unasked` (*n of them), else how many a ROOM must ask for (nothing counted).
  // `granted`: blocks a ROOM answer counted for this write already (Grant), which take the place
  // of these: a grant is this write's alone, never consumable by another write's check.
  uint64_t TakeCredit(uint64_t first, uint64_t end, uint64_t granted, uint64_t* n) {
    uint64_t m = 0;
    for (uint64_t b = first; b < end; b++) m += !Test(present, b);
    if (m && !granted && credit_limit >= 0 && unasked + m > static_cast<uint64_t>(credit_limit)) return m;
    unasked = unasked - std::min(unasked, granted) + m;
    *n = m;
    return 0;
  }
  // A hit (budget): its units were used.
  void Access(uint64_t first, uint64_t end) {
    if (!budget || fault_no_accessed) return;
    for (uint64_t u = first >> unit_shift, ue = ((end - 1) >> unit_shift) + 1; u < ue; u++) Set(accessed, u);
  }
  bool Evicting(uint64_t first, uint64_t end) const {
    if (!evicting_count) return false;
    for (uint64_t b = first; b < end; b++)
      if (Test(evicting, b)) return true;
    return false;
  }
  // Does a request hold a block of [first, end) busy, or a unit fill's claim? A request on such
  // blocks parks until they are let go (Start).
  bool Held(uint64_t first, uint64_t end) const {
    for (auto [f, e] : held)
      if (f < e && f < end && first < e) return true;
    return Claimed(first, end);
  }
  bool Claimed(uint64_t first, uint64_t end) const {
    if (!claimed_count) return false;
    for (uint64_t b = first; b < end; b++)
      if (Test(claimed, b)) return true;
    return false;
  }

  int32_t Sync() {
    count.flushes++;
    if (cache_error.load()) return -EIO;
    int e = fault_fsync_at && ++syncs == fault_fsync_at ? EIO : fdatasync(cache_fd) == 0 ? 0 : errno;
    if (e) {
      int zero = 0;
      cache_error.compare_exchange_strong(zero, e);
      return -EIO;
    }
    return 0;
  }

  void WakeAll();
  bool QueueEnded(unsigned q) const;

  // ---- a cache budget: the calls the daemon makes (JS thread) ----

  // Takes the accessed bits of units [first, first + count) into `out` (bit i: unit first + i)
  // and clears them here; returns how many were set.
  uint64_t TakeAccessed(uint64_t first, uint64_t count, uint8_t* out) {
    uint64_t n = 0;
    std::lock_guard<std::mutex> g(mu);
    for (uint64_t i = 0; i < count; i++) {
      uint64_t u = first + i;
      if ((u & 63) == 0 && i + 64 <= count && accessed[u >> 6] == 0) {  // a word of nothing
        i += 63;
        continue;
      }
      if (Test(accessed, u)) {
        Clear(accessed, u);
        out[i >> 3] |= static_cast<uint8_t>(1u << (i & 7));
        n++;
      }
    }
    return n;
  }

  // Evicts the blocks set in `bits` (bit i: block first + i), narrowing `bits` in place to those
  // it evicted, and returns their count (~0 when the wait timed out: nothing evicted). Refused (bit cleared): dirty blocks, and blocks a
  // request holds busy (a miss being filled, a first write, its whole-block data, its read after
  // the fill) or writes. The rest stop being served (present bits cleared under mu: a read of
  // them from now on is a miss, which the daemon's eviction lock holds back), and the call
  // returns only once no hit read that found them present is still in flight on any queue: the
  // daemon may then clear them durably and punch (invariant 1). The wait is on the queue threads'
  // reads of the cache file only (never on the JS thread), so it is short and cannot deadlock.
  uint64_t Evict(uint64_t first, uint64_t count, uint8_t* bits) {
    uint64_t end = first + count, n = 0;
    uint8_t old;
    Bits was_present((count + 63) / 64, 0);  // bit i: block first + i was present (a timeout puts it back)
    {
      std::lock_guard<std::mutex> g(mu);
      auto refuse = [&](uint64_t f, uint64_t e) {
        for (uint64_t b = std::max(f, first); b < std::min(e, end); b++) bits[(b - first) >> 3] &= static_cast<uint8_t>(~(1u << ((b - first) & 7)));
      };
      // A read waiting for its MISS (not the oldest) gives up the present blocks of its range:
      // it is marked stale where it loses one, and misses again once answered.
      uint64_t oldest = 0;
      for (uint64_t w : miss_wait)
        if (w && (!oldest || w < oldest)) oldest = w;
      std::vector<size_t> yielding;
      for (size_t k = 0; k < held.size(); k++) {
        auto [f, e] = held[k];
        if (f >= e) continue;
        if (k < miss_wait.size() && miss_wait[k] && miss_wait[k] != oldest && f < end && first < e) {
          // its blocks not present (being filled) stay refused
          for (uint64_t b = std::max(f, first); b < std::min(e, end); b++)
            if (!Test(present, b)) bits[(b - first) >> 3] &= static_cast<uint8_t>(~(1u << ((b - first) & 7)));
          yielding.push_back(k);
          continue;
        }
        refuse(f, e);
      }
      for (auto [f, e] : writing)
        if (f < e) refuse(f, e);
      for (uint64_t i = 0; i < count; i++) {
        if (!(bits[i >> 3] >> (i & 7) & 1)) continue;
        uint64_t b = first + i;
        if (Test(dirty, b) || (claimed_count && Test(claimed, b))) {
          bits[i >> 3] &= static_cast<uint8_t>(~(1u << (i & 7)));
          continue;
        }
        for (size_t k : yielding)
          if (held[k].first <= b && b < held[k].second) miss_stale[k] = 1;
        if (Test(present, b)) {
          Clear(present, b);
          present_count--;
          Set(was_present, i);
        }
        if (!Test(evicting, b)) Set(evicting, b), evicting_count++;
        n++;
      }
      old = read_phase;
      if (!fault_evict_nowait) read_phase ^= 1;
    }
    // Hits that began before the clear are counted in phase `old`; every later one in the other.
    // Evictions come from the JS thread only, one at a time, and each waits for its old phase to
    // drain before it returns, so a phase is empty again by the time the next flip reuses it.
    // A queue whose thread has ended counts nothing in flight: its ring was closed (or its
    // reads reaped) before `done`, so nothing can still read into a request. The wait is
    // bounded (kEvictWaitUs): past it the eviction is undone (present bits back, nothing
    // returned, ETIMEDOUT) rather than freezing the event loop.
    if (!fault_evict_nowait) {
      uint64_t waited = 0;
      for (unsigned i = 0;; i++) {
        bool busy = false;
        for (unsigned q = 0; q < kMaxQueues; q++) {
          if (q < queues.size() && QueueEnded(q)) continue;
          busy |= hit_reads[q].n[old].load(std::memory_order_acquire) != 0;
        }
        if (!busy) break;
        if (waited >= kEvictWaitUs) {
          {
            std::lock_guard<std::mutex> g(mu);
            for (uint64_t j = 0; j < count; j++) {
              if (!(bits[j >> 3] >> (j & 7) & 1)) continue;
              uint64_t b = first + j;
              if (Test(was_present, j) && !Test(present, b)) Set(present, b), present_count++;
              if (Test(evicting, b)) Clear(evicting, b), evicting_count--;
            }
          }
          memset(bits, 0, (count + 7) / 8);
          WakeAll();  // requests that parked on them meanwhile go on (review9 U-B)
          return ~0ULL;
        }
        unsigned us = i < 10 ? 20 : 200;
        usleep(us);
        waited += us;
      }
    }
    evicted += n;
    return n;
  }

  // The daemon has cleared (durably) and punched blocks [first, first + count) that Evict
  // returned, or given up on them: requests parked on them try again (they miss).
  void EvictDone(uint64_t first, uint64_t count) {
    {
      std::lock_guard<std::mutex> g(mu);
      for (uint64_t b = first; b < first + count; b++)
        if (Test(evicting, b)) Clear(evicting, b), evicting_count--;
    }
    WakeAll();
  }

  // ROOM answered for n blocks (before the reply is sent): counted now, outside the limit, for
  // the write that asked (TakeCredit then swaps them for its blocks). Returns the count.
  uint64_t Grant(uint64_t n) {
    std::lock_guard<std::mutex> g(mu);
    unasked += n;
    return unasked;
  }

  // CREDIT: sets the limit (blocks; -1: none) and returns the blocks counted against it now.
  uint64_t Credit(int64_t limit) {
    std::lock_guard<std::mutex> g(mu);
    credit_limit = limit;
    return unasked;
  }

  // CLAIM of blocks [first, first + count) (count <= kMaxClaimBlocks): the blocks neither present,
  // dirty, held by a request, written, evicting nor claimed already are set in `out` (bit i:
  // block first + i; the caller zeroed it) and kept claimed until Filled. Returns the claim's id
  // (> 0), 0 when no block was free, or -EAGAIN when kMaxClaims claims are outstanding.
  int64_t Claim(uint64_t first, uint64_t count, uint8_t* out) {
    std::lock_guard<std::mutex> g(mu);
    if (claims.size() >= kMaxClaims) return -EAGAIN;
    uint64_t end = first + count;
    Bits mine((count + 63) / 64, 0);
    uint64_t n = 0;
    for (uint64_t b = first; b < end; b++) {
      if (Test(present, b) || Test(dirty, b) || Test(claimed, b) || (evicting_count && Test(evicting, b))) continue;
      bool busy = false;
      for (auto [f, e] : held) busy |= f < e && f <= b && b < e;
      for (auto [f, e] : writing) busy |= f < e && f <= b && b < e;
      if (busy) continue;
      Set(mine, b - first);
      n++;
    }
    if (!n) return 0;
    for (uint64_t i = 0; i < count; i++) {
      if (!Test(mine, i)) continue;
      Set(claimed, first + i);
      out[i >> 3] |= static_cast<uint8_t>(1u << (i & 7));
    }
    claimed_count += n;
    claims.push_back(ClaimRange{++claim_seq, first, count, std::move(mine)});
    return static_cast<int64_t>(claim_seq);
  }

  // FILLED of claim `id` over its range [first, first + count): the claimed blocks set in `bits`
  // become present (their data is in the cache file, synced: the daemon's word), the other
  // claimed ones are let go, still missing; requests parked on them go on. -ENOENT: no such
  // claim; -EINVAL: another range, or a bit set on a block the claim does not hold (nothing
  // changes).
  int Filled(uint64_t id, uint64_t first, uint64_t count, const uint8_t* bits) {
    {
      std::lock_guard<std::mutex> g(mu);
      auto it = std::find_if(claims.begin(), claims.end(), [&](const ClaimRange& c) { return c.id == id; });
      if (it == claims.end()) return -ENOENT;
      if (it->first != first || it->count != count) return -EINVAL;
      for (uint64_t i = 0; i < count; i++)
        if ((bits[i >> 3] >> (i & 7) & 1) && !Test(it->bits, i)) return -EINVAL;
      uint64_t made = 0;
      for (uint64_t i = 0; i < count; i++) {
        if (!Test(it->bits, i)) continue;
        uint64_t b = first + i;
        Clear(claimed, b);
        claimed_count--;
        if ((bits[i >> 3] >> (i & 7) & 1) && !Test(present, b)) Set(present, b), made++;
      }
      present_count += made;
      claims.erase(it);
    }
    WakeAll();
    return 0;
  }
};

// One hardware queue: its ring, its thread, its tags with their buffers. A request is served on
// the queue the block layer put it on (blk-mq maps CPUs to queues) from FETCH to COMMIT; what is
// shared between queues (block state, busy ranges) is the Server's, under its mu. Everything
// here belongs to the queue's thread, except the reply list (reply_mu) and nparked (Server::mu).
struct HwQueue {
  Server* s = nullptr;
  uint16_t id = 0;
  Ring ring;
  // pthread, not std::thread: the addon is built without C++ exceptions, so a failed std::thread
  // would terminate the daemon instead of failing the attach.
  pthread_t thread{};
  bool running_thread = false;
  int event_fd = -1;  // replies from JS and wake-ups from other queues
  struct ublksrv_io_desc* descs = nullptr;
  size_t descs_len = 0;
  std::vector<uint8_t*> bufs;
  std::vector<Tag> tags;
  std::deque<uint16_t> parked;  // requests waiting for blocks another request holds
  unsigned nparked = 0;         // under Server::mu: parked is not empty, for the other queues to see
  std::vector<uint8_t> tag_failures;
  std::vector<uint8_t> fetching;  // the tag's last command was a FETCH (its refusal is fatal)
  uint64_t event_buf = 0;
  unsigned aborted = 0;
  unsigned reads_in_flight = 0;  // QueueRead's reads not yet completed
  std::atomic<int> thread_error{0};
  std::atomic<bool> done{false};
  std::atomic<uint64_t> requests{0};
  std::mutex reply_mu;
  std::vector<std::pair<uint32_t, int32_t>> replies;

  ~HwQueue() {
    for (auto* b : bufs) free(b);
    if (descs) munmap(descs, descs_len);
    ring.Close();
    if (event_fd >= 0) close(event_fd);
  }

  size_t Slot(uint16_t tag) const { return static_cast<size_t>(id) * s->depth + tag; }

  // Every io_uring_enter of the queue thread (but the batched wait's: Run).
  int Enter(unsigned wait, unsigned limit = ~0u) { return ring.Enter(wait, limit); }

  // The batched wait was asked for ($ULOBDEV_UBLK_BATCH) and this queue's ring can bound a wait.
  bool BatchWait() const { return s->batch_wait > 1 && (ring.features & kFeatMinTimeout); }

  void Wake() {
    uint64_t one = 1;
    (void)!write(event_fd, &one, sizeof(one));
  }

  void QueueIo(uint16_t tag, uint32_t op, int32_t result) {
    auto* sqe = ring.Get();
    if (!sqe) {  // full: push what is queued and retry (depth + 1 entries, so rare)
      Enter(0);
      sqe = ring.Get();
    }
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = s->cdev_fd;
    sqe->cmd_op = op;
    sqe->user_data = tag;
    fetching[tag] = op == kIoFetch;
    auto* c = reinterpret_cast<struct ublksrv_io_cmd*>(sqe->cmd);
    c->q_id = id;
    c->tag = tag;
    c->result = result;
    // Zero copy: the command's addr stays 0 (user copy), and struct ublk_auto_buf_reg goes in the
    // SQE's own addr: the fixed-buffer index (the tag) in its low 16 bits, no flags (no
    // fallback: a failed registration fails the request).
    if (s->zero_copy) sqe->addr = tag;
    else c->addr = reinterpret_cast<uintptr_t>(bufs[tag]);
  }

  // Reads the cache file at the request's offset, from byte t.read_done on, on this queue's ring:
  // zero copy into the request's pages (IORING_OP_READ_FIXED, fixed buffer `tag`), else into the
  // tag's buffer (IORING_OP_READ), which its COMMIT copies. OnRead continues a short read and
  // finishes the request. No system call of its own: it goes in with the next io_uring_enter
  // (with the COMMITs of other tags), and several are in flight per queue.
  struct io_uring_sqe* QueueRead(uint16_t tag) {
    Tag& t = tags[tag];
    auto* sqe = ring.Get();
    if (!sqe) {
      Enter(0);
      sqe = ring.Get();
    }
    sqe->fd = s->cache_fd;
    if (s->zero_copy) {
      sqe->opcode = IORING_OP_READ_FIXED;
      sqe->addr = t.read_done;  // an offset into the registered request pages (their base is 0)
      sqe->buf_index = tag;
    } else {
      sqe->opcode = IORING_OP_READ;
      sqe->addr = reinterpret_cast<uintptr_t>(bufs[tag] + t.read_done);
    }
    sqe->len = static_cast<uint32_t>(t.len - t.read_done);
    sqe->off = t.off + t.read_done;
    sqe->user_data = kReadData | tag;
    reads_in_flight++;
    return sqe;
  }

  void OnRead(uint16_t tag, int32_t res) {
    Tag& t = tags[tag];
    reads_in_flight--;
    if (res < 0) return Finish(tag, res);
    if (res == 0) return Finish(tag, -EIO);  // the cache file ends before the device: never, but no loop
    t.read_done += static_cast<uint64_t>(res);
    if (t.read_done < t.len) {
      QueueRead(tag);
      return;
    }
    if (s->zero_copy) s->count.zero_copy_reads++;
    Finish(tag, static_cast<int32_t>(t.len));
  }

  // A read whose blocks are all present (a hit, or a miss once its blocks are in): served from
  // the cache file by a read on the ring.
  void ServeRead(uint16_t tag) {
    tags[tag].read_done = 0;
    QueueRead(tag);
  }

  // A read hit: served like any read whose blocks are present, its COMMIT_AND_FETCH queued by
  // OnRead once the read has completed. Not linked behind the read (IOSQE_IO_LINK, tried in session
  // 10): a COMMIT the kernel issues by itself can run after the server has died and 6.12's
  // ublk_abort_queue has requeued the request (UBLK_F_USER_RECOVERY_REISSUE); that COMMIT then ends
  // the request while it sits on the requeue list, and the next requeue work oopses on it
  // (test/vm/ublk-hits.test.ts). Linking had bought no throughput (bench/README.md).
  void ServeHit(uint16_t tag) {
    Tag& t = tags[tag];
    t.read_done = 0;
    auto* rd = QueueRead(tag);
    if (s->fault_ebadf_at <= t.off + t.len - 1 && t.off <= s->fault_ebadf_at && !s->fault_ebadf_done.exchange(true)) rd->fd = -1;
  }

  // Zero copy: the write's data, from the request's pages into the tag's buffer (user copy).
  int32_t CopyWriteIn(uint16_t tag) {
    Tag& t = tags[tag];
    const uint64_t base = kUserCopyBase | static_cast<uint64_t>(id) << kUserCopyQueueShift | static_cast<uint64_t>(tag) << kUserCopyTagShift;
    uint64_t done = 0;
    while (done < t.len) {
      ssize_t n = pread(s->cdev_fd, bufs[tag] + done, t.len - done, static_cast<off_t>(base + done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return n < 0 ? -errno : -EIO;
      done += static_cast<uint64_t>(n);
    }
    return 0;
  }

  void ArmEvent() {
    auto* sqe = ring.Get();
    if (!sqe) {
      Enter(0);
      sqe = ring.Get();
    }
    sqe->opcode = IORING_OP_READ;
    sqe->fd = event_fd;
    sqe->addr = reinterpret_cast<uintptr_t>(&event_buf);
    sqe->len = sizeof(event_buf);
    sqe->user_data = kEventData;
  }

  // Submits the FETCHes (and the eventfd read) queued by Run; 0 or a positive errno. A transient
  // refusal (ENOMEM, EAGAIN, EBUSY: io_uring_enter(2)) or a partial submit is tried again after
  // 1, 2, 4 ... 256 ms (about 0.5 s in all) on a new device; inside a user recovery, where a
  // failure costs the device and its queued I/O (Recover) while waiting costs nothing (the device
  // is quiesced), for about 10 s (then every 500 ms).
  int SubmitFetches() {
    const unsigned tries = s->start_recovering ? 27 : 8;
    for (unsigned i = 0;; i++) {
      int e = s->fault_start_queue == id + 1u ? ENOMEM : Enter(0);
      if (e == 0 && ring.to_submit == 0) return 0;
      if (e != 0 && e != ENOMEM && e != EAGAIN && e != EBUSY) return e;
      if (i == tries || s->stopping.load()) return e ? e : EAGAIN;
      usleep(i < 9 ? 1000u << i : 500000u);
    }
  }

  void Run() {
    if (s->start_recovering && s->fault_stall_queue == id + 1u)
      for (int i = 0; i < 1200 && !s->stopping.load(); i++) usleep(100000);
    for (uint16_t t = 0; t < s->depth; t++) QueueIo(t, kIoFetch, -1);
    ArmEvent();
    // The FETCHes go in without waiting, and a refusal comes back at once: only then may
    // START_DEV (or END_USER_RECOVERY) be asked, which waits until every queue has fetched all.
    int e = SubmitFetches();
    if (e == 0) {
      ring.Reap([&](const struct io_uring_cqe& cqe) { OnCqe(cqe); });
      e = thread_error.load();
      if (e == 0 && aborted) e = ENODEV;  // a FETCH answered "device going": that tag is not fetched
    }
    if (e) thread_error = e;
    s->QueueStarted(id, e);
    unsigned backoff_us = 1000;
    // The batched wait (Server::batch_wait): only for a wait whose completions are the driver's
    // (new requests, replies): with a read of the cache file in flight the thread waits for it
    // alone, since its request's COMMIT follows it. `idle`: the last bounded wait brought
    // nothing, so the queue sleeps until something comes.
    const bool batch = BatchWait();
    bool idle = false;
    while (!e && !s->stopping.load()) {
      const bool bounded = batch && !idle && reads_in_flight == 0;
      e = s->fault_enter_at && s->served.load() >= s->fault_enter_at &&
              (s->fault_enter_times == 0 || s->enter_faults.fetch_add(1) < s->fault_enter_times)
          ? ENOMEM
          : bounded ? ring.EnterBounded(s->batch_wait, s->batch_wait_us)
                    : Enter(1);
      if (e == EAGAIN || e == EBUSY) {  // io_uring_enter(2): transient, try again shortly
        usleep(1000);
        e = 0;
        continue;
      }
      if (e && !s->control_done.load()) {
        // START_DEV (its partition scan) may be waiting for a request this queue holds or its
        // reply: ending the queue now would hang that command for good. Keep trying until it has
        // returned (or the attach is undone).
        usleep(backoff_us);
        backoff_us = backoff_us < 100000 ? backoff_us * 2 : 100000;
        e = 0;
        continue;
      }
      if (e) {
        thread_error = e;
        break;
      }
      backoff_us = 1000;
      unsigned n = ring.Reap([&](const struct io_uring_cqe& cqe) { OnCqe(cqe); });
      idle = bounded && n == 0;
      if (aborted >= s->depth) break;
    }
    // A read still in flight writes into the tag's buffer (copy path), which EndQueues frees:
    // its completion is waited for (bounded, and not on a ring that fails).
    for (int i = 0; reads_in_flight > 0 && i < 1000; i++) {
      if (Enter(1) != 0) break;
      ring.Reap([&](const struct io_uring_cqe& cqe) { OnCqe(cqe); });
    }
    // Unless stopped, this is the end of serving: closing the ring makes the driver cancel the
    // fetches, so the device quiesces (user recovery) for the next daemon; JS sees done.
    if (!s->stopping.load()) ring.Close();
    done = true;
  }

  void OnCqe(const struct io_uring_cqe& cqe) {
    if (cqe.user_data == kEventData) {
      TakeReplies();
      RetryParked();
      if (!s->stopping.load()) ArmEvent();
      return;
    }
    if (cqe.user_data & kReadData) return OnRead(static_cast<uint16_t>(cqe.user_data), cqe.res);
    uint16_t tag = static_cast<uint16_t>(cqe.user_data);
    if (cqe.res == 0) {  // UBLK_IO_RES_OK: a request
      s->served++;
      requests++;
      Handle(tag);
    } else if (cqe.res == -ENODEV) {  // UBLK_IO_RES_ABORT: the device is going
      aborted++;
    } else if (cqe.res < 0 && fetching[tag]) {
      // A refused FETCH leaves the tag unfetched: the device would never be ready (START_DEV
      // waits for ever) or would lose a tag. Fatal at once.
      thread_error = -cqe.res;
      aborted = s->depth;
    } else if (cqe.res < 0 && ++tag_failures[tag] <= 3) {
      // The driver refused the commit: its request is failed, the tag fetched again.
      s->count.errors++;
      QueueIo(tag, kIoCommitFetch, -EIO);
    } else if (cqe.res < 0) {
      thread_error = -cqe.res;
      aborted = s->depth;
    }
  }

  // A hit's read is over (complete in the request's pages or the tag's buffer, or failed): the
  // cache file may be punched under it from now on (Server::Evict waits for the count).
  void EndHitRead(uint16_t tag) {
    Tag& t = tags[tag];
    if (t.hit_counted) {
      t.hit_counted = false;
      s->hit_reads[id].n[t.read_phase].fetch_sub(1, std::memory_order_release);
    }
  }

  void Finish(uint16_t tag, int32_t result) {
    Tag& t = tags[tag];
    if (result < 0) s->count.errors++;
    EndHitRead(tag);
    // Blocks this write put into the cache file whose INTENT was never answered stay counted
    // (unasked, as lost): the store does not hold them, the next attach punches them.
    // A grant never used (a failure between ROOM and the write) stays counted too: rare, and on
    // the safe side.
    t.unasked = 0;
    t.granted = false;
    t.room = 0;
    if (t.holds) {
      t.holds = false;
      bool others = false;
      {
        std::lock_guard<std::mutex> g(s->mu);
        s->held[Slot(tag)] = {0, 0};
        if (!s->miss_wait.empty()) s->miss_wait[Slot(tag)] = 0, s->miss_stale[Slot(tag)] = 0;
        for (auto& q : s->queues) others |= q.get() != this && q->nparked;
      }
      // Requests that waited for these blocks try again, here and on the other queues.
      if (others) s->WakeAll();
      RetryParked();
    }
    t.waiting = false;
    QueueIo(tag, kIoCommitFetch, result);
  }

  void RetryParked() {
    std::deque<uint16_t> again;
    {
      std::lock_guard<std::mutex> g(s->mu);
      again.swap(parked);
      nparked = 0;
    }
    for (uint16_t p : again) Start(p);
  }

  int32_t Pwrite(uint16_t tag, uint64_t off, uint64_t len) {
    Tag& t = tags[tag];
    uint64_t done = 0;
    const uint8_t* src = bufs[tag] + (off - t.off);
    while (done < len) {
      ssize_t n = pwrite(s->cache_fd, src + done, len - done, static_cast<off_t>(off + done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        int e = n < 0 ? errno : EIO;
        int zero = 0;
        s->cache_error.compare_exchange_strong(zero, e);
        return -e;
      }
      done += static_cast<uint64_t>(n);
    }
    return 0;
  }

  // A new request on `tag` (FETCH completed): served here, or started on its way through JS.
  // FLUSH on any queue covers every write acknowledged on every queue before it: a write is in the
  // cache file (pwrite) and recorded dirty (its intent) before its COMMIT, and fdatasync syncs the
  // file, whichever thread wrote it.
  void Handle(uint16_t tag) {
    const struct ublksrv_io_desc& d = descs[tag];
    Tag& t = tags[tag];
    t.op = static_cast<uint8_t>(d.op_flags & 0xff);
    t.fua = (d.op_flags & kIoFFua) != 0;
    t.off = d.start_sector << 9;
    t.len = static_cast<uint64_t>(d.nr_sectors) << 9;
    t.first = t.off / s->block_size;
    t.end = s->BlockEnd(t.off, t.len);
    t.holds = t.waiting = false;
    if (t.op == kOpFlush) return Finish(tag, s->Sync());
    if (t.op != kOpRead && t.op != kOpWrite && t.op != kOpDiscard && t.op != kOpWriteZeroes) return Finish(tag, -EOPNOTSUPP);
    if (t.off + t.len > s->size || t.len > s->buf_bytes) return Finish(tag, -EIO);
    if (t.op == kOpRead) {
      bool hit;
      {
        std::lock_guard<std::mutex> g(s->mu);
        hit = s->BeginHit(id, t.first, t.end, &t.read_phase, &t.hit_counted);
      }
      if (hit && s->fault_hit_ms && t.off <= s->fault_hit_at && s->fault_hit_at < t.off + t.len && !s->fault_hit_done.exchange(true))
        usleep(static_cast<useconds_t>(s->fault_hit_ms * 1000));
      if (hit) {
        s->count.read_hits++;
        return ServeHit(tag);
      }
      s->count.read_misses++;
      t.step = kReadMiss;
      return Start(tag);
    }
    if (s->read_only) return Finish(tag, -EROFS);
    if (s->cache_error.load()) return Finish(tag, -EIO);
    if (s->zero_copy && t.op == kOpWrite) {
      int32_t r = CopyWriteIn(tag);
      if (r < 0) return Finish(tag, r);
    }
    // DISCARD and WRITE_ZEROES write zeros: the range then reads as zeros, as the engine's TRIM
    // promises, and reaches the disk at the next flush.
    if (t.op != kOpWrite) memset(bufs[tag], 0, t.len);
    if (FastWrite(tag)) return;
    s->count.write_upcalls++;
    t.step = kWHead;
    Start(tag);
  }

  // A write into blocks that are all dirty, outside a flush epoch's unpreserved snapshot: written
  // here. The check and the registration in `writing` are one critical section, so an epoch
  // commit on the JS thread either sees the write (and keeps its blocks dirty) or ran before the
  // check (and the write goes through an intent). False when it needs the daemon.
  bool FastWrite(uint16_t tag) {
    Tag& t = tags[tag];
    {
      std::lock_guard<std::mutex> g(s->mu);
      if (!AllSet(s->dirty, t.first, t.end)) return false;
      if (s->InSnapshot(t.first, t.end)) return false;
      if (s->epoch_open) s->Touch(t.first, t.end);
      s->writing[Slot(tag)] = {t.first, t.end};
      s->Access(t.first, t.end);
    }
    s->count.write_hits++;
    int32_t r = Pwrite(tag, t.off, t.len);
    {
      std::lock_guard<std::mutex> g(s->mu);
      s->writing[Slot(tag)] = {0, 0};
    }
    if (r == 0 && t.fua) r = s->Sync();
    Finish(tag, r == 0 ? static_cast<int32_t>(t.len) : r);
    return true;
  }

  // Takes the request's blocks (or parks it behind a request on any queue holding some) and
  // advances it.
  void Start(uint16_t tag) {
    Tag& t = tags[tag];
    {
      std::lock_guard<std::mutex> g(s->mu);
      if (s->Held(t.first, t.end) || s->Evicting(t.first, t.end)) {
        parked.push_back(tag);
        nparked = 1;
        return;
      }
      s->held[Slot(tag)] = {t.first, t.end};
    }
    t.holds = true;
    Advance(tag);
  }

  // `bytes`: the upcall's length when it is not the blocks' (ROOM: the count of blocks it asks for).
  void Upcall(uint16_t tag, uint8_t type, uint64_t first, uint64_t end, uint64_t ep, uint64_t bytes = ~0ULL) {
    Tag& t = tags[tag];
    t.seq++;
    t.waiting = true;
    t.up_type = type;
    t.up_first = first;
    t.up_end = end;
    auto* m = new UpcallMsg{UpcallId(t.seq, id, tag), type, first * s->block_size, bytes != ~0ULL ? bytes : s->Bytes(first, end), ep};
    napi_status st = s->tsfn.NonBlockingCall(m, [](Napi::Env env, Napi::Function fn, UpcallMsg* u) {
      if (env != nullptr && fn != nullptr) {
        fn.Call({Napi::Number::New(env, u->id), Napi::Number::New(env, u->type), Napi::Number::New(env, static_cast<double>(u->offset)),
                 Napi::Number::New(env, static_cast<double>(u->length)), Napi::Number::New(env, static_cast<double>(u->epoch))});
      }
      delete u;
    });
    if (st != napi_ok) {
      delete m;
      Finish(tag, -EIO);
    }
  }

  void TakeReplies() {
    std::vector<std::pair<uint32_t, int32_t>> got;
    {
      std::lock_guard<std::mutex> g(reply_mu);
      got.swap(replies);
    }
    for (auto [rid, error] : got) {
      uint16_t tag = rid & 0xfff;
      if (tag >= s->depth) continue;
      Tag& t = tags[tag];
      if (!t.waiting || t.seq != (rid >> 16)) continue;
      t.waiting = false;
      if (error < 0) {
        Finish(tag, error);
        continue;
      }
      // A MISS answered: exactly its blocks are in the cache file now. Nothing else sets present
      // but an answered INTENT (after the data of whole missing blocks was written).
      if (t.up_type == kUpMiss) {
        std::lock_guard<std::mutex> g(s->mu);
        bool stale = false;
        if (s->budget && t.step == kReadDone) {
          stale = s->miss_stale[Slot(tag)];
          s->miss_wait[Slot(tag)] = 0;
          s->miss_stale[Slot(tag)] = 0;
        }
        // An eviction took present blocks of this read's range while it waited: its fill says
        // nothing about them; the read looks again (and misses again).
        if (stale) t.step = kReadMiss;
        else s->MarkPresent(t.up_first, t.up_end);
      }
      if (t.up_type == kUpRoom) t.granted = true;
      // The store holds the blocks this write put there while missing from the INTENT's answer on
      // (present and dirty), so they leave the credit's count (kWIntented marks them present).
      if (t.up_type == kUpIntent && t.unasked) {
        std::lock_guard<std::mutex> g(s->mu);
        s->unasked -= std::min(s->unasked, t.unasked);
        t.unasked = 0;
      }
      Advance(tag);
    }
  }

  bool Partial(uint64_t block, const Tag& t) const {
    uint64_t b0 = block * s->block_size, b1 = b0 + s->block_size > s->size ? s->size : b0 + s->block_size;
    return t.off > b0 || t.off + t.len < b1;
  }

  // The steps of a request that holds its blocks: each upcall returns, and its reply resumes here.
  void Advance(uint16_t tag) {
    Tag& t = tags[tag];
    for (;;) {
      switch (t.step) {
        case kReadMiss: {
          t.step = kReadDone;
          std::unique_lock<std::mutex> g(s->mu);
          // Parked behind a unit fill's claim (or another request), its blocks were made present
          // meanwhile: read them now, held (no eviction takes them), without a MISS (review12 U-1).
          if (AllSet(s->present, t.first, t.end)) break;
          if (s->budget) {
            s->miss_wait[Slot(tag)] = ++s->miss_seq;
            s->miss_stale[Slot(tag)] = 0;
          }
          g.unlock();
          return Upcall(tag, kUpMiss, t.first, t.end, 0);
        }
        case kReadDone:
          return ServeRead(tag);
        case kWHead: {
          // A block the write covers in part and the cache does not hold is filled first (rule 5).
          t.step = kWTail;
          bool miss;
          {
            std::lock_guard<std::mutex> g(s->mu);
            miss = Partial(t.first, t) && !Test(s->present, t.first);
          }
          if (miss) return Upcall(tag, kUpMiss, t.first, t.first + 1, 0);
          break;
        }
        case kWTail: {
          t.step = kWWhole;
          uint64_t last = t.end - 1;
          bool miss;
          {
            std::lock_guard<std::mutex> g(s->mu);
            miss = last != t.first && Partial(last, t) && !Test(s->present, last);
          }
          if (miss) return Upcall(tag, kUpMiss, last, last + 1, 0);
          break;
        }
        case kWWhole: {
          // Whole blocks the cache does not hold get their data before the intent: the intent
          // syncs it before it records them dirty (invariant 1), and a crash before the intent
          // leaves them missing, so they read from the disk (an unacknowledged write's right).
          // No other request touches them meanwhile: they are held, and not present, so reads
          // of them miss and park behind this one.
          // With a budget they are counted first (the credit), and past the limit the daemon makes
          // room for them (ROOM: evicts, flushes; this request waits) before any is written.
          if (s->budget && !t.unasked) {
            uint64_t room = 0;
            {
              std::lock_guard<std::mutex> g(s->mu);
              room = s->TakeCredit(t.first, t.end, t.granted ? t.room : 0, &t.unasked);
            }
            if (room) {
              s->rooms++;
              // The upcall's length says how many blocks (the handler needs the count only);
              // the reply comes back to this step with `granted` set.
              t.room = room;
              return Upcall(tag, kUpRoom, t.first, t.end, 0, room * s->block_size);
            }
          }
          t.step = kWPreserve;
          for (uint64_t b = t.first; b < t.end; b++) {
            bool have;
            {
              std::lock_guard<std::mutex> g(s->mu);
              have = Test(s->present, b);
            }
            if (have) continue;
            uint64_t b0 = b * s->block_size, b1 = b0 + s->block_size;
            uint64_t st = t.off > b0 ? t.off : b0, e = t.off + t.len < b1 ? t.off + t.len : b1;
            int32_t r = Pwrite(tag, st, e - st);
            if (r < 0) return Finish(tag, r);
          }
          break;
        }
        case kWPreserve: {
          uint64_t ep = 0;
          {
            std::lock_guard<std::mutex> g(s->mu);
            if (s->InSnapshot(t.first, t.end)) ep = s->epoch;
          }
          t.step = kWIntent;
          if (ep) {
            t.up_epoch = ep;
            t.step = kWPreserved;
            return Upcall(tag, kUpPreserve, t.first, t.end, ep);
          }
          break;
        }
        case kWPreserved: {
          std::lock_guard<std::mutex> g(s->mu);
          if (s->epoch_open && s->epoch == t.up_epoch) s->Touch(t.first, t.end);
          t.step = kWIntent;
          break;
        }
        case kWIntent: {
          bool need;
          {
            std::lock_guard<std::mutex> g(s->mu);
            need = !AllSet(s->dirty, t.first, t.end);
          }
          t.step = kWWrite;
          if (need) {
            t.step = kWIntented;
            return Upcall(tag, kUpIntent, t.first, t.end, 0);
          }
          break;
        }
        case kWIntented: {
          std::lock_guard<std::mutex> g(s->mu);
          s->MarkDirty(t.first, t.end);
          s->MarkPresent(t.first, t.end);
          t.step = kWWrite;
          break;
        }
        case kWWrite: {
          {
            std::lock_guard<std::mutex> g(s->mu);
            // An epoch begun since the preserve step: its version of these blocks first.
            if (s->InSnapshot(t.first, t.end)) {
              t.step = kWPreserve;
              continue;
            }
            // A flush epoch committed since the intent may have cleaned these blocks: intent again
            // (the check and the registration below are one critical section, as in FastWrite).
            if (!AllSet(s->dirty, t.first, t.end)) {
              t.step = kWIntent;
              continue;
            }
            if (s->epoch_open) s->Touch(t.first, t.end);
            s->writing[Slot(tag)] = {t.first, t.end};
          }
          int32_t r = Pwrite(tag, t.off, t.len);
          {
            std::lock_guard<std::mutex> g(s->mu);
            s->writing[Slot(tag)] = {0, 0};
          }
          if (r == 0 && t.fua) r = s->Sync();
          return Finish(tag, r == 0 ? static_cast<int32_t>(t.len) : r);
        }
      }
    }
  }
};

Server::~Server() {
  queues.clear();
  if (cdev_fd >= 0) close(cdev_fd);
  if (cache_fd >= 0) close(cache_fd);
  if (ctrl_fd >= 0) close(ctrl_fd);
}

bool Server::QueueEnded(unsigned q) const { return queues[q]->done.load(); }

void Server::WakeAll() {
  for (auto& q : queues) q->Wake();
}

// JS holds the server as an External; the finalizer deletes it once stopped (or never started).
struct Handle {
  Server* s;
};

bool ReadU32(Napi::Object o, const char* k, uint32_t* out) {
  Napi::Value v = o.Get(k);
  if (!v.IsNumber()) {
    Napi::TypeError::New(o.Env(), std::string("options.") + k).ThrowAsJavaScriptException();
    return false;
  }
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= 0 && d <= 4294967295.0) || static_cast<double>(static_cast<uint32_t>(d)) != d) {
    Napi::RangeError::New(o.Env(), std::string("options.") + k).ThrowAsJavaScriptException();
    return false;
  }
  *out = static_cast<uint32_t>(d);
  return true;
}

int Log2(uint32_t v) {
  int s = 0;
  while ((1u << s) < v) s++;
  return s;
}

// A process that runs (a zombie has let go of its rings and devices: it counts as dead).
bool PidAlive(int32_t pid) {
  if (pid <= 0 || (kill(pid, 0) != 0 && errno != EPERM)) return false;
  char path[64], buf[256];
  snprintf(path, sizeof path, "/proc/%d/stat", pid);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return true;
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0) return true;
  buf[n] = 0;
  const char* p = strrchr(buf, ')');
  return !(p && p[1] == ' ' && (p[2] == 'Z' || p[2] == 'X'));
}

// Ends every queue thread and lets go of its ring and descriptors (the HwQueue objects stay: a late
// reply may still name them).
void EndQueues(Server& s) {
  s.stopping = true;
  s.WakeAll();
  for (auto& q : s.queues) {
    if (q->running_thread) pthread_join(q->thread, nullptr);
    q->running_thread = false;
    q->ring.Close();
    if (q->descs) munmap(q->descs, q->descs_len);
    q->descs = nullptr;
    // The tags' buffers (depth x bufBytes per queue) are the thread's alone; replies need only
    // the tags and the eventfd.
    for (auto* b : q->bufs) free(b);
    q->bufs.clear();
  }
}

// Adds (or recovers) the device and starts serving it: runs on the threadpool.
class StartWorker_ : public PromiseWorker {
 public:
  StartWorker_(Napi::Env env, Server* s, int32_t want) : PromiseWorker(env, "ulob:ublkStart", "ublk start"), s_(s), want_(want) {}

  void Execute() override {
    Server& s = *s_;
    s.ctrl_fd = open("/dev/ublk-control", O_RDWR | O_CLOEXEC);
    if (s.ctrl_fd < 0) return Fail(errno, "open(/dev/ublk-control)");
    uint64_t feats = 0;
    int r = CtrlCmd(s.ctrl_fd, kCmdGetFeatures, 0, 0, &feats, sizeof(feats), 0);
    s.features = r == 0 ? feats : 0;
    struct ublksrv_ctrl_dev_info info = {};
    if (want_ >= 0) {
      r = CtrlCmd(s.ctrl_fd, kCmdGetDevInfo, static_cast<uint32_t>(want_), 0, &info, sizeof(info), 0);
      if (r == 0) {
        // A device of this number exists: take it back from a dead daemon of this cache (user
        // recovery), refuse it otherwise.
        if (PidAlive(info.ublksrv_pid) && info.ublksrv_pid != getpid()) return Fail(EBUSY, "ublk device served by a live process");
        // Its daemon just died: the driver quiesces the device in a work item after the dead
        // process's ring is cancelled. Until then it still says LIVE; deciding then would delete it.
        for (int i = 0; i < 1500 && info.state == kStateLive && (info.flags & kFUserRecovery); i++) {
          usleep(20000);
          if (CtrlCmd(s.ctrl_fd, kCmdGetDevInfo, static_cast<uint32_t>(want_), 0, &info, sizeof(info), 0) < 0) break;
        }
        if (info.state == kStateLive) return Fail(EBUSY, "ublk device live without its daemon");
        struct ublk_params p = {};
        p.len = sizeof(p);
        if (CtrlCmd(s.ctrl_fd, kCmdGetParams, static_cast<uint32_t>(want_), 0, &p, sizeof(p), 0) < 0 ||
            p.basic.dev_sectors != s.size >> 9)
          return Fail(EEXIST, "ublk device of another size");
        if (info.state == kStateQuiesced && (info.flags & kFUserRecovery)) {
          // A marker left by a recovery that died part-way: that START_USER_RECOVERY dropped every
          // queue's daemon task and some queue may have none now, which the next START would put
          // (6.12: an oops). The device goes and is added again instead.
          if (!MarkerExists() && Recover(want_, info)) return;
          if (err_) return;
        }
        // Dead without recovery, or half-recovered: what is left of it goes, and it is added again.
        s.replaced = true;
        if (!DeleteLeftover(want_)) return;
      } else if (r != -ENODEV) {
        return Fail(-r, "UBLK_CMD_GET_DEV_INFO");
      } else {
        RemoveMarker();  // no device: a marker a reboot or a delete left says nothing
      }
    }
    info = {};
    info.nr_hw_queues = s.nr_queues;
    info.queue_depth = s.depth;
    info.max_io_buf_bytes = s.buf_bytes;
    info.dev_id = want_ >= 0 ? static_cast<uint32_t>(want_) : ~0u;
    info.ublksrv_pid = getpid();
    info.flags = kFCmdIoctlEncode;
    if (s.features & kFUserRecovery) info.flags |= kFUserRecovery | (s.features & kFUserRecoveryReissue);
    if ((s.features & kFZeroCopyPath) == kFZeroCopyPath && !s.force_copy) info.flags |= kFZeroCopyPath;
    r = CtrlCmd(s.ctrl_fd, kCmdAddDev, info.dev_id, 0xffff, &info, sizeof(info), 0);
    if (r < 0) return Fail(-r, "UBLK_CMD_ADD_DEV");
    s.zero_copy = (info.flags & kFZeroCopyPath) == kFZeroCopyPath;
    s.dev_id = static_cast<int>(info.dev_id);
    // The driver gives at most one queue per possible CPU.
    s.nr_queues = info.nr_hw_queues;
    added_ = true;
    s.owned = true;
    struct ublk_params p = {};
    p.len = sizeof(p);
    p.types = UBLK_PARAM_TYPE_BASIC | (s.read_only ? 0 : UBLK_PARAM_TYPE_DISCARD);
    p.basic.attrs = UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA | (s.read_only ? UBLK_ATTR_READ_ONLY : 0);
    p.basic.logical_bs_shift = static_cast<uint8_t>(Log2(s.lbs));
    p.basic.physical_bs_shift = static_cast<uint8_t>(Log2(s.pbs));
    p.basic.io_min_shift = p.basic.physical_bs_shift;
    p.basic.io_opt_shift = p.basic.physical_bs_shift;
    p.basic.max_sectors = s.buf_bytes >> 9;
    p.basic.dev_sectors = s.size >> 9;
    p.discard.discard_granularity = s.block_size;
    p.discard.max_discard_sectors = s.buf_bytes >> 9;
    p.discard.max_write_zeroes_sectors = s.buf_bytes >> 9;
    p.discard.max_discard_segments = 1;
    r = CtrlCmd(s.ctrl_fd, kCmdSetParams, s.dev_id, 0, &p, sizeof(p), 0);
    if (r < 0) return Undo(-r, "UBLK_CMD_SET_PARAMS");
    if (!PrepareQueues() || !StartQueues()) return;
    r = CtrlCmd(s.ctrl_fd, kCmdStartDev, s.dev_id, 0, nullptr, 0, static_cast<uint64_t>(getpid()));
    s.control_done = true;
    if (r < 0) return Undo(-r, "UBLK_CMD_START_DEV");
  }

  Napi::Value Result(Napi::Env env) override {
    Napi::Object o = Napi::Object::New(env);
    o.Set("devId", Napi::Number::New(env, s_->dev_id));
    o.Set("recovered", Napi::Boolean::New(env, s_->recovered));
    o.Set("replaced", Napi::Boolean::New(env, s_->replaced));
    o.Set("features", Napi::Number::New(env, static_cast<double>(s_->features & ((1ULL << 53) - 1))));
    o.Set("zeroCopy", Napi::Boolean::New(env, s_->zero_copy));
    return o;
  }

 private:
  Server* s_;
  int32_t want_;
  bool added_ = false;
  bool recovering_ = false;  // START_USER_RECOVERY succeeded: every queue's old daemon was dropped
  std::string start_what_;  // syscall_ points into it

  void Fail(int e, const char* what) {
    err_ = e;
    syscall_ = what;
  }

  // A failure after ADD_DEV or START_USER_RECOVERY: the device goes (the queue threads, if
  // started, with it). Before either, EndQueues alone lets go of what PrepareQueues made.
  void Undo(int e, const char* what) {
    Fail(e, what);
    Server& s = *s_;
    EndQueues(s);
    s.serving = false;
    if (s.cdev_fd >= 0) close(s.cdev_fd);
    s.cdev_fd = -1;
    if (added_) {
      CtrlCmd(s.ctrl_fd, kCmdDelDev, s.dev_id, 0, nullptr, 0, 0);
    } else if (recovering_) {
      // START_USER_RECOVERY dropped every queue's daemon task; the queues that did not FETCH now
      // have none, and on 6.12 the next START_USER_RECOVERY puts that NULL task (ublk_queue_reinit:
      // WARN_ON_ONCE, then put_task_struct(NULL), an oops under ub->mutex); with no queue
      // fetched it refuses for good (nr_queues_ready 0). So the half-recovered device goes: its
      // queued requests fail with EIO (every acknowledged write is in the cache and the store's
      // dirty set), and the next attach adds it again. Without waiting: a filesystem still
      // mounted on it holds its number until unmounted, and DEL_DEV would wait for that. Before 6.9
      // (no DEL_DEV_ASYNC) STOP_DEV: the device is then dead, never again QUIESCED, and no
      // START_USER_RECOVERY reaches it (the next attach deletes the leftover). Once it is gone
      // (or dead) the marker has said what it had to; if the command failed, the marker makes the
      // next attach delete it.
      int r = CtrlCmd(s.ctrl_fd, kCmdDelDevAsync, s.dev_id, 0, nullptr, 0, 0);
      if (r == -EOPNOTSUPP) r = CtrlCmd(s.ctrl_fd, kCmdStopDev, s.dev_id, 0, nullptr, 0, 0);
      if (r == 0 || r == -ENODEV) RemoveMarker();
    }
    s.owned = false;
  }

  // ---- the durable "recovering" marker (Server::marker, RUN_DIR/ublkbN.recovering) ----
  // Written (and fsynced, with its directory) before START_USER_RECOVERY and removed once every
  // queue has fetched: a daemon killed in between leaves it, and the next attach deletes the
  // device and adds it again instead of recovering it (see Recover). RUN_DIR is usually a tmpfs,
  // as volatile as the device itself; the fsyncs keep it true on a persistent one.
  bool MarkerExists() const { return !s_->marker.empty() && access(s_->marker.c_str(), F_OK) == 0; }

  int SyncMarkerDir() const {
    const std::string& m = s_->marker;
    size_t slash = m.rfind('/');
    std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : m.substr(0, slash);
    int d = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (d < 0) return errno;
    int e = fsync(d) == 0 ? 0 : errno;
    close(d);
    return e;
  }

  // 0 or a positive errno.
  int WriteMarker() const {
    Server& s = *s_;
    if (s.marker.empty()) return 0;
    int fd = open(s.marker.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return errno;
    std::string text = "pid " + std::to_string(getpid()) + " recovering /dev/ublkb" + std::to_string(s.dev_id) + " of " + s.cache_path + "\n";
    int e = 0;
    errno = 0;  // a short write sets none
    if (write(fd, text.data(), text.size()) != static_cast<ssize_t>(text.size())) e = errno ? errno : EIO;
    if (e == 0 && fsync(fd) != 0) e = errno;
    close(fd);
    return e ? e : SyncMarkerDir();
  }

  void RemoveMarker() const {
    if (!s_->marker.empty() && unlink(s_->marker.c_str()) == 0) SyncMarkerDir();
  }

  // Deletes what is left of device `id` (dead, or half-recovered) so that it can be added again:
  // DEL_DEV_ASYNC (6.9+; before it DEL_DEV, which waits until the old disk is closed). The number
  // is free once the old disk's last opener lets go: at once, unless a filesystem is still
  // mounted on it. Then the attach fails with EADDRINUSE after about 5 s (JS says: unmount it,
  // run the same command again) instead of waiting in DEL_DEV until the unmount (review-ublk6).
  // The delete comes first: unmounting a filesystem from a quiesced device would wait for ever
  // on its writeback, from a deleted one it fails fast.
  bool DeleteLeftover(int32_t id) {
    Server& s = *s_;
    int r = CtrlCmd(s.ctrl_fd, kCmdDelDevAsync, static_cast<uint32_t>(id), 0, nullptr, 0, 0);
    if (r == -EOPNOTSUPP) r = CtrlCmd(s.ctrl_fd, kCmdDelDev, static_cast<uint32_t>(id), 0, nullptr, 0, 0);
    if (r < 0 && r != -ENODEV) {
      Fail(-r, "UBLK_CMD_DEL_DEV (leftover)");
      return false;
    }
    RemoveMarker();
    for (int i = 0; i < 250; i++) {
      struct ublksrv_ctrl_dev_info info = {};
      r = CtrlCmd(s.ctrl_fd, kCmdGetDevInfo, static_cast<uint32_t>(id), 0, &info, sizeof(info), 0);
      if (r == -ENODEV) return true;
      if (r < 0) {
        Fail(-r, "UBLK_CMD_GET_DEV_INFO (leftover)");
        return false;
      }
      usleep(20000);
    }
    Fail(EADDRINUSE, "UBLK_CMD_DEL_DEV (leftover): the old disk is still open, its number held");
    return false;
  }

  // Makes one HwQueue per hardware queue with what needs no device: tags, eventfd, buffers, ring.
  // For a recovery this runs before START_USER_RECOVERY, so that what can fail for want of memory
  // or descriptors fails while the device still has its old daemon tasks. False: Fail was called
  // and what was made is let go.
  bool PrepareQueues() {
    Server& s = *s_;
    s.stopping = false;
    {
      std::lock_guard<std::mutex> g(s.mu);
      s.writing.assign(static_cast<size_t>(s.nr_queues) * s.depth, {0, 0});
      s.held.assign(static_cast<size_t>(s.nr_queues) * s.depth, {0, 0});
      s.miss_wait.assign(s.held.size(), 0);
      s.miss_stale.assign(s.held.size(), 0);
    }
    s.queues.clear();
    auto fail = [&](int e, const char* what) {
      if (added_ || recovering_) {
        Undo(e, what);
      } else {
        Fail(e, what);
        EndQueues(s);
      }
      return false;
    };
    for (uint16_t qi = 0; qi < s.nr_queues; qi++) {
      auto q = std::make_unique<HwQueue>();
      q->s = &s;
      q->id = qi;
      q->tags.resize(s.depth);
      q->tag_failures.assign(s.depth, 0);
      q->fetching.assign(s.depth, 0);
      q->event_fd = eventfd(0, EFD_CLOEXEC);
      if (q->event_fd < 0) return fail(errno, "eventfd");
      for (uint32_t t = 0; t < s.depth; t++) {
        void* b = nullptr;
        if (posix_memalign(&b, 4096, s.buf_bytes) != 0) return fail(ENOMEM, "posix_memalign");
        q->bufs.push_back(static_cast<uint8_t*>(b));
      }
      // Room for every tag's command and, zero copy, its READ_FIXED, and the eventfd read.
      // COOP_TASKRUN (5.19+): the driver's task work (a new request, a COMMIT's next FETCH) and
      // the reads' completions reach the queue thread without an interrupt of its own; they run
      // when it enters the ring, which it does to wait for them (or after each batch) anyway.
      // (ring-einval, a test hook: a flag no kernel has, refused with EINVAL as on a kernel before 5.19)
      int e = q->ring.Init(2 * s.depth + 2, (s.coop_taskrun ? IORING_SETUP_COOP_TASKRUN : 0) | (s.fault_ring_einval ? 1U << 31 : 0));
      if (e) return fail(e, "io_uring_setup");
      if (s.zero_copy) {
        // An empty fixed-buffer table, one slot per tag: the driver fills slot `tag` with the
        // request's pages before each FETCH completes.
        struct io_uring_rsrc_register rr = {};
        rr.nr = s.depth;
        rr.flags = IORING_RSRC_REGISTER_SPARSE;
        if (syscall(__NR_io_uring_register, q->ring.fd, IORING_REGISTER_BUFFERS2, &rr, sizeof(rr)) < 0) {
          return fail(errno, "io_uring_register(IORING_REGISTER_BUFFERS2)");
        }
      }
      s.queues.push_back(std::move(q));
    }
    return true;
  }

  // Opens /dev/ublkcN, maps each queue's descriptor array (mmap at its queue's offset) and starts
  // one thread per hardware queue. Needs the device (and, for a recovery, START_USER_RECOVERY:
  // the driver refuses a second open of /dev/ublkcN and maps only for the recovering process).
  bool StartQueues() {
    Server& s = *s_;
    std::string cdev = "/dev/ublkc" + std::to_string(s.dev_id);
    // devtmpfs makes the node with the device; udev may still be changing its mode.
    for (int i = 0; i < 200; i++) {
      s.cdev_fd = open(cdev.c_str(), O_RDWR | O_CLOEXEC);
      if (s.cdev_fd >= 0 || (errno != ENOENT && errno != EACCES)) break;
      usleep(10000);
    }
    if (s.cdev_fd < 0) {
      Undo(errno, "open(/dev/ublkcN)");
      return false;
    }
    size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    // ublk_ch_mmap: queue q's descriptors sit at UBLKSRV_CMD_BUF_OFFSET + q * (the largest array, page-rounded).
    size_t stride = (UBLK_MAX_QUEUE_DEPTH * sizeof(struct ublksrv_io_desc) + page - 1) / page * page;
    for (auto& q : s.queues) {
      q->descs_len = (s.depth * sizeof(struct ublksrv_io_desc) + page - 1) / page * page;
      void* m = mmap(nullptr, q->descs_len, PROT_READ, MAP_SHARED | MAP_POPULATE, s.cdev_fd, static_cast<off_t>(UBLKSRV_CMD_BUF_OFFSET + q->id * stride));
      if (m == MAP_FAILED) {
        Undo(errno, "mmap(/dev/ublkcN)");
        return false;
      }
      q->descs = static_cast<struct ublksrv_io_desc*>(m);
    }
    // Every queue's FETCHes must be in before START_DEV (or END_USER_RECOVERY) is asked: it waits
    // for them uninterruptibly. Each thread says when they are, or that it failed.
    s.control_done = false;
    {
      std::lock_guard<std::mutex> g(s.start_mu);
      s.started_ok = 0;
      s.start_error = 0;
    }
    for (auto& q : s.queues) {
      HwQueue* qp = q.get();
      int e = pthread_create(&qp->thread, nullptr, [](void* q) -> void* {
        static_cast<HwQueue*>(q)->Run();
        return nullptr;
      }, qp);
      if (e) {
        Undo(e, "pthread_create (a queue thread)");
        return false;
      }
      qp->running_thread = true;
    }
    int e;
    uint16_t failed_queue;
    {
      std::unique_lock<std::mutex> g(s.start_mu);
      s.start_cv.wait(g, [&] { return s.start_error != 0 || s.started_ok == s.queues.size(); });
      e = s.start_error;
      failed_queue = s.start_error_queue;
    }
    if (e) {
      start_what_ = "io_uring_enter (FETCH, queue " + std::to_string(failed_queue) + ")";
      Undo(e, start_what_.c_str());
      return false;
    }
    s.serving = true;
    return true;
  }

  // Takes device `id` back from a dead daemon: true when done (taken back, or failed: err_ set),
  // false when it can never be (START_USER_RECOVERY refuses for good: a recovery that died before
  // any queue fetched, by a daemon that left no marker): the caller deletes it and adds it again.
  bool Recover(int32_t id, const struct ublksrv_ctrl_dev_info& info) {
    Server& s = *s_;
    // The queues are the device's (a daemon started with another count, or on a machine with
    // other CPUs, takes them as they are); the tags' depth and buffers must be ours.
    if (info.queue_depth != s.depth || info.nr_hw_queues < 1 || info.nr_hw_queues > kMaxQueues || info.max_io_buf_bytes != s.buf_bytes) {
      Fail(EEXIST, "ublk device of another queue shape");
      return true;
    }
    // The data path is the device's too: a device added with both flags is served zero copy (the
    // driver copies nothing for it), one added with neither through the buffers.
    uint64_t path = info.flags & kFZeroCopyPath;
    if (path != 0 && path != kFZeroCopyPath) {
      Fail(EEXIST, "ublk device of another data path");
      return true;
    }
    s.zero_copy = path == kFZeroCopyPath;
    s.nr_queues = info.nr_hw_queues;
    s.dev_id = id;
    // What can fail without the device fails here, while every queue still has its old daemon.
    if (!PrepareQueues()) return true;
    // The dead daemon's /dev/ublkcN may still be closing (START_USER_RECOVERY says EBUSY until
    // then): an open of ours fails with EBUSY while it is, and is closed at once. Waiting here
    // rather than in START's retries keeps the marker's window short.
    std::string cdev = "/dev/ublkc" + std::to_string(id);
    for (int i = 0; i < 300; i++) {
      int fd = open(cdev.c_str(), O_RDWR | O_CLOEXEC);
      if (fd >= 0) close(fd);
      if (fd >= 0 || errno != EBUSY) break;
      usleep(20000);
    }
    int e = WriteMarker();
    if (e) {
      Fail(e, "write(RUN_DIR/ublkbN.recovering)");
      EndQueues(s);
      return true;
    }
    int r = -EBUSY;
    for (int i = 0; i < 300 && r == -EBUSY; i++) {
      r = CtrlCmd(s.ctrl_fd, kCmdStartRecovery, id, 0, nullptr, 0, 0);
      if (r == -EBUSY) usleep(20000);
    }
    if (r == -EINVAL) {
      // 6.12: no queue has a daemon (nr_queues_ready 0), for good. The marker stays until the
      // delete is done.
      EndQueues(s);
      return false;
    }
    if (r < 0) {
      RemoveMarker();  // refused: no daemon task was dropped
      EndQueues(s);
      Fail(-r, "UBLK_CMD_START_USER_RECOVERY");
      return true;
    }
    recovering_ = true;
    s.start_recovering = true;
    if (!StartQueues()) return true;  // Undo deletes the half-recovered device
    // Every queue has fetched: each has a daemon task (this process) again, which a kill from here
    // on leaves dying, as the next START_USER_RECOVERY expects.
    RemoveMarker();
    r = CtrlCmd(s.ctrl_fd, kCmdEndRecovery, id, 0, nullptr, 0, static_cast<uint64_t>(getpid()));
    s.control_done = true;
    s.start_recovering = false;
    // A failure here leaves a device the next attach can recover once this process is gone.
    if (r < 0) {
      Fail(-r, "UBLK_CMD_END_USER_RECOVERY");
      return true;
    }
    s.recovered = true;
    s.owned = true;
    return true;
  }
};
// Stops and deletes the device: STOP_DEV (the disk goes once I/O in flight is served), the queue
// thread and its ring, /dev/ublkcN, DEL_DEV. On the threadpool: STOP_DEV waits for requests that
// may need JS.
class StopWorker : public PromiseWorker {
 public:
  StopWorker(Napi::Env env, Server* s) : PromiseWorker(env, "ulob:ublkStop", "UBLK_CMD_STOP_DEV"), s_(s) {}

  void Execute() override {
    Server& s = *s_;
    int r = 0;
    if (s.owned) r = CtrlCmd(s.ctrl_fd, kCmdStopDev, s.dev_id, 0, nullptr, 0, 0);
    if (r < 0 && r != -ENODEV) err_ = -r;
    EndQueues(s);
    if (s.cdev_fd >= 0) close(s.cdev_fd);
    s.cdev_fd = -1;
    r = s.owned ? CtrlCmd(s.ctrl_fd, kCmdDelDev, s.dev_id, 0, nullptr, 0, 0) : 0;
    s.owned = false;
    if (r < 0 && r != -ENODEV && err_ == 0) {
      err_ = -r;
      syscall_ = "UBLK_CMD_DEL_DEV";
    }
  }

  void OnOK() override {
    s_->tsfn.Release();
    PromiseWorker::OnOK();
  }

 private:
  Server* s_;
};

Server* ServerOf(const Napi::CallbackInfo& info) {
  if (!info[0].IsExternal()) {
    Napi::TypeError::New(info.Env(), "handle").ThrowAsJavaScriptException();
    return nullptr;
  }
  return info[0].As<Napi::External<Server>>().Data();
}

// ublkCreate({ cachePath, size, blockSize, logical, physical, depth, bufBytes, readOnly }, present,
//            dirty, onUpcall) -> handle. The bitmaps are the store's (bit per block, LSB first):
// the blocks served here from the start. onUpcall(id, type, offset, length, epoch) on the JS thread.
Napi::Value Create(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsObject() || !info[3].IsFunction()) {
    Napi::TypeError::New(env, "ublkCreate(options, present, dirty, onUpcall)").ThrowAsJavaScriptException();
    return Napi::Value();
  }
  Napi::Object o = info[0].As<Napi::Object>();
  uint32_t block_size, lbs, pbs, depth, buf_bytes, queues;
  int64_t size;
  Bytes present, dirty;
  if (!ReadU32(o, "blockSize", &block_size) || !ReadU32(o, "logical", &lbs) || !ReadU32(o, "physical", &pbs) ||
      !ReadU32(o, "depth", &depth) || !ReadU32(o, "bufBytes", &buf_bytes) || !ReadU32(o, "queues", &queues) ||
      !ArgBytes(info, 1, &present) || !ArgBytes(info, 2, &dirty))
    return Napi::Value();
  Napi::Value sv = o.Get("size");
  double sd = sv.IsNumber() ? sv.As<Napi::Number>().DoubleValue() : -1;
  if (!(sd > 0 && sd <= kMaxSafeInteger) || static_cast<double>(static_cast<int64_t>(sd)) != sd) {
    Napi::RangeError::New(env, "options.size").ThrowAsJavaScriptException();
    return Napi::Value();
  }
  size = static_cast<int64_t>(sd);
  if (block_size < 512 || (block_size & (block_size - 1)) || size % 512 || lbs < 512 || lbs > 4096 || (lbs & (lbs - 1)) ||
      pbs < lbs || (pbs & (pbs - 1)) || depth < 1 || depth > 4096 || queues < 1 || queues > kMaxQueues || buf_bytes < 4096 || buf_bytes % 4096 ||
      buf_bytes > (1u << 30)) {  // results are int32 byte counts: at most 1 GiB a request
    Napi::RangeError::New(env, "bad geometry").ThrowAsJavaScriptException();
    return Napi::Value();
  }
  uint64_t blocks = (static_cast<uint64_t>(size) + block_size - 1) / block_size;
  if (present.length < (blocks + 7) / 8 || dirty.length < (blocks + 7) / 8) {
    Napi::RangeError::New(env, "bitmap too small").ThrowAsJavaScriptException();
    return Napi::Value();
  }
  std::string path = o.Get("cachePath").ToString().Utf8Value();
  bool read_only = o.Get("readOnly").ToBoolean().Value();
  Napi::Value mv = o.Get("recoveryMarker");
  std::string marker = mv.IsString() ? mv.As<Napi::String>().Utf8Value() : "";
  auto* s = new Server();
  s->cache_path = path;
  s->marker = marker;
  s->size = static_cast<uint64_t>(size);
  s->block_size = block_size;
  s->blocks = blocks;
  s->lbs = lbs;
  s->pbs = pbs;
  s->depth = static_cast<uint16_t>(depth);
  s->nr_queues = static_cast<uint16_t>(queues);
  s->buf_bytes = buf_bytes;
  s->read_only = read_only;
  s->cache_fd = open(path.c_str(), (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
  if (s->cache_fd < 0) {
    int e = errno;
    delete s;
    ThrowErrno(env, e, "open(cache file)");
    return Napi::Value();
  }
  if (const char* c = getenv("ULOBDEV_UBLK_COPY")) s->force_copy = strcmp(c, "1") == 0;
  if (const char* c = getenv("ULOBDEV_UBLK_TASKRUN")) s->coop_taskrun = strcmp(c, "0") != 0;
  if (const char* c = getenv("ULOBDEV_UBLK_BATCH")) {
    // K[,US]: K from 1 (off) to the queue depth, US from 1 to 10,000 µs; anything else is a mistake
    char* end = nullptr;
    unsigned long k = strtoul(c, &end, 10);
    unsigned long us = kBatchWaitUsDefault;
    auto digit = [](char x) { return x >= '0' && x <= '9'; };  // strtoul would take spaces and signs
    bool ok = digit(c[0]) && k <= s->depth;
    if (ok && *end == ',') {
      const char* u = end + 1;
      us = strtoul(u, &end, 10);
      ok = digit(u[0]) && us >= 1 && us <= 10000;
    }
    if (!ok || *end != 0) {
      delete s;
      Napi::RangeError::New(env, "$ULOBDEV_UBLK_BATCH: K[,US], K completions (1 = off) up to the queue depth, US µs from 1 to 10000").ThrowAsJavaScriptException();
      return Napi::Value();
    }
    s->batch_wait = k < 1 ? 1 : static_cast<unsigned>(k);
    s->batch_wait_us = static_cast<uint32_t>(us);
  }
  if (const char* f = getenv("ULOBDEV_UBLK_FAULT")) {
    if (const char* p = strstr(f, "fsync-eio-at=")) s->fault_fsync_at = strtoull(p + 13, nullptr, 10);
    if (const char* p = strstr(f, "enter-enomem-at=")) s->fault_enter_at = strtoull(p + 16, nullptr, 10);
    if (const char* p = strstr(f, "enter-enomem-times=")) s->fault_enter_times = strtoull(p + 19, nullptr, 10);
    if (const char* p = strstr(f, "enter-enomem-at-start=")) s->fault_start_queue = static_cast<unsigned>(strtoul(p + 22, nullptr, 10)) + 1;
    if (const char* p = strstr(f, "recovery-stall-queue=")) s->fault_stall_queue = static_cast<unsigned>(strtoul(p + 21, nullptr, 10)) + 1;
    s->fault_evict_nowait = strstr(f, "evict-nowait") != nullptr;
    s->fault_no_accessed = strstr(f, "no-accessed") != nullptr;
    if (const char* p = strstr(f, "hit-delay-at=")) s->fault_hit_at = strtoull(p + 13, nullptr, 10);
    if (const char* p = strstr(f, "hit-delay-ms=")) s->fault_hit_ms = strtoull(p + 13, nullptr, 10);
    if (const char* p = strstr(f, "hit-ebadf-at=")) s->fault_ebadf_at = strtoull(p + 13, nullptr, 10);
    s->fault_ring_einval = strstr(f, "ring-einval") != nullptr;
  }
  FromBytes(s->present, present.data, present.length, blocks);
  FromBytes(s->dirty, dirty.data, dirty.length, blocks);
  for (size_t i = 0; i < s->dirty.size(); i++) s->present[i] |= s->dirty[i];  // dirty data is in the cache
  uint64_t np = 0, nd = 0;
  for (auto w : s->present) np += static_cast<uint64_t>(__builtin_popcountll(w));
  for (auto w : s->dirty) nd += static_cast<uint64_t>(__builtin_popcountll(w));
  s->present_count = np;
  s->dirty_count = nd;
  Napi::Value us = o.Get("unitShift");
  if (us.IsNumber()) {
    double u = us.As<Napi::Number>().DoubleValue();
    if (!(u >= 0 && u <= 20) || static_cast<double>(static_cast<int>(u)) != u) {
      delete s;
      Napi::RangeError::New(env, "options.unitShift").ThrowAsJavaScriptException();
      return Napi::Value();
    }
    // A budget: accessed bits per unit, and whole-block writes into missing blocks within a
    // credit that starts at 0 (a write before the daemon's first CREDIT asks for ROOM).
    s->budget = true;
    s->unit_shift = static_cast<uint32_t>(u);
    s->accessed.assign(((((blocks + (1ULL << s->unit_shift) - 1) >> s->unit_shift)) + 63) / 64, 0);
    s->credit_limit = 0;
    s->evicting.assign(s->present.size(), 0);
    s->claimed.assign(s->present.size(), 0);
  }
  s->touched.assign(s->present.size(), 0);
  s->touched_gen.assign((s->touched.size() + kTouchChunkWords - 1) / kTouchChunkWords, 0);
  s->tsfn = Napi::ThreadSafeFunction::New(env, info[3].As<Napi::Function>(), "ulob:ublk", 0, 1);
  if (env.IsExceptionPending()) {
    delete s;
    return Napi::Value();
  }
  // Never freed while a queue thread may run: stop() ends it first, and a handle dropped
  // without stop() belongs to a process that is exiting.
  return Napi::External<Server>::New(env, s);
}

// ublkStart(handle, devId) -> Promise<{ devId, recovered, features }>; devId -1: any free N.
Napi::Value Start(const Napi::CallbackInfo& info) {
  Server* s = ServerOf(info);
  if (!s) return Napi::Value();
  double d = info[1].IsNumber() ? info[1].As<Napi::Number>().DoubleValue() : -2;
  if (!(d >= -1 && d < 1048576) || static_cast<double>(static_cast<int32_t>(d)) != d) {
    Napi::RangeError::New(info.Env(), "devId").ThrowAsJavaScriptException();
    return Napi::Value();
  }
  return StartWorker(info.Env(), new StartWorker_(info.Env(), s, static_cast<int32_t>(d)));
}

// ublkStop(handle) -> Promise<void>.
Napi::Value Stop(const Napi::CallbackInfo& info) {
  Server* s = ServerOf(info);
  if (!s) return Napi::Value();
  return StartWorker(info.Env(), new StopWorker(info.Env(), s));
}

// ublkReply(handle, id, error): error 0 or a negative errno.
Napi::Value Reply(const Napi::CallbackInfo& info) {
  Server* s = ServerOf(info);
  if (!s) return Napi::Value();
  int64_t id;
  if (!ArgInt64(info, 1, &id)) return Napi::Value();
  double e = info[2].IsNumber() ? info[2].As<Napi::Number>().DoubleValue() : 1;
  if (!(e >= -4095 && e <= 0) || static_cast<double>(static_cast<int32_t>(e)) != e) {
    Napi::RangeError::New(info.Env(), "expected 0 or a negative errno").ThrowAsJavaScriptException();
    return Napi::Value();
  }
  // The queues are made before any upcall and kept until the process exits.
  uint32_t qi = (static_cast<uint32_t>(id) >> 12) & 0xf;
  if (!s->serving.load() || qi >= s->queues.size()) return info.Env().Undefined();
  HwQueue& q = *s->queues[qi];
  {
    std::lock_guard<std::mutex> g(q.reply_mu);
    q.replies.emplace_back(static_cast<uint32_t>(id), static_cast<int32_t>(e));
  }
  q.Wake();
  return info.Env().Undefined();
}

// ublkEpochBegin(handle, dirty) -> epoch: the dirty blocks now, into `dirty` (a whole-device
// bitmap); until the commit a write to one of them first asks to PRESERVE it, and every block
// written since (writes in flight included) is remembered. The lock is held only to open the
// epoch and to take out what changed during the copy, never for a pass over the disk.
Napi::Value EpochBegin(const Napi::CallbackInfo& info) {
  Server* s = ServerOf(info);
  Bytes out;
  if (!s || !ArgBytes(info, 1, &out)) return Napi::Value();
  uint64_t ep;
  {
    std::lock_guard<std::mutex> g(s->mu);
    s->epoch++;  // `touched` of every older epoch now reads as zeros
    s->epoch_open = true;
    s->copying = true;
    s->late_dirty.clear();
    s->begin_writing.clear();
    for (auto [first, end] : s->writing)
      if (first < end) s->begin_writing.emplace_back(first, end);
    ep = s->epoch;
  }
  if (s->test_mid_copy.first < s->test_mid_copy.second) {
    std::lock_guard<std::mutex> g(s->mu);
    s->MarkDirty(s->test_mid_copy.first, s->test_mid_copy.second);
    s->test_mid_copy = {0, 0};
  }
  // Only the commit (this thread) clears dirty bits: meanwhile bits are only set, and those set
  // since the epoch opened are in late_dirty (and touched), so the copy is the dirty set at the
  // begin once they are taken out.
  for (uint64_t w = 0; w < s->dirty.size(); w++) StoreWord(out.data, out.length, w, __atomic_load_n(&s->dirty[w], __ATOMIC_RELAXED));
  if (out.length > s->dirty.size() * 8) memset(out.data + s->dirty.size() * 8, 0, out.length - s->dirty.size() * 8);
  {
    std::lock_guard<std::mutex> g(s->mu);
    for (auto [first, end] : s->late_dirty)
      for (uint64_t b = first; b < end && (b >> 3) < out.length; b++) out.data[b >> 3] &= static_cast<uint8_t>(~(1u << (b & 7)));
    s->late_dirty.clear();
    s->copying = false;
  }
  return Napi::Number::New(info.Env(), static_cast<double>(ep));
}

// ublkEpochCommit(handle, epoch, flushed) -> cleared. `flushed` (written back to the disk) is
// narrowed in place to the blocks not written since the begin, whose dirty bits are cleared.
// Throws ESTALE for an epoch that is not the open one (an empty `flushed` just ends it). Works in
// slices of kCommitSliceWords, letting go of the lock between them: a block cleared in an earlier
// slice is clean (a write to it asks for an intent), one in a later slice is still in the snapshot
// (a write to it preserves first and is touched, so it stays dirty).
Napi::Value EpochCommit(const Napi::CallbackInfo& info) {
  Server* s = ServerOf(info);
  int64_t epoch;
  Bytes flushed;
  if (!s || !ArgInt64(info, 1, &epoch) || !ArgBytes(info, 2, &flushed)) return Napi::Value();
  {
    std::lock_guard<std::mutex> g(s->mu);
    if (!s->epoch_open || static_cast<uint64_t>(epoch) != s->epoch) {
      ThrowErrno(info.Env(), ESTALE, "ublk epoch commit");
      return Napi::Value();
    }
    // The writeback has read the snapshot: from here on only what the commit clears matters.
    for (auto [first, end] : s->begin_writing) s->Touch(first, end);
    s->begin_writing.clear();
  }
  uint64_t cleared = 0, words = s->dirty.size();
  for (uint64_t w0 = 0; w0 < words; w0 += kCommitSliceWords) {
    uint64_t w1 = std::min(words, w0 + kCommitSliceWords), n = 0;
    std::lock_guard<std::mutex> g(s->mu);
    for (uint64_t w = w0; w < w1; w++) {
      uint64_t f = LoadWord(flushed.data, flushed.length, w);
      if (!f) continue;
      f &= ~s->TouchedWord(w) & s->dirty[w];
      s->dirty[w] &= ~f;
      n += static_cast<uint64_t>(__builtin_popcountll(f));
      StoreWord(flushed.data, flushed.length, w, f);
    }
    s->dirty_count -= n;
    cleared += n;
  }
  if (flushed.length > words * 8) memset(flushed.data + words * 8, 0, flushed.length - words * 8);
  {
    std::lock_guard<std::mutex> g(s->mu);
    s->epoch_open = false;
  }
  return Napi::Number::New(info.Env(), static_cast<double>(cleared));
}

// ublkQuery(handle) -> counts: blocks present and dirty, requests by kind and per queue. Reads
// counters only: no lock, no bitmap.
Napi::Value Query(const Napi::CallbackInfo& info) {
  Server* s = ServerOf(info);
  if (!s) return Napi::Value();
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  auto n = [&](const char* k, uint64_t v) { o.Set(k, Napi::Number::New(env, static_cast<double>(v))); };
  n("presentBlocks", s->present_count.load());
  n("dirtyBlocks", s->dirty_count.load());
  n("readHits", s->count.read_hits);
  n("readMisses", s->count.read_misses);
  n("zeroCopyReads", s->count.zero_copy_reads);
  n("writeHits", s->count.write_hits);
  n("writeUpcalls", s->count.write_upcalls);
  n("flushes", s->count.flushes);
  n("ioErrors", s->count.errors);
  n("evictedBlocks", s->evicted.load());
  {
    std::lock_guard<std::mutex> g(s->mu);
    n("claimedBlocks", s->claimed_count);
  }
  n("rooms", s->rooms.load());
  bool serving = s->serving.load(), running = serving;
  int thread_error = 0;
  bool coop = serving;
  bool batch = serving;
  Napi::Array per = Napi::Array::New(env);
  if (serving) {
    for (size_t i = 0; i < s->queues.size(); i++) {
      HwQueue& q = *s->queues[i];
      running = running && !q.done.load();
      coop = coop && (q.ring.flags & IORING_SETUP_COOP_TASKRUN);
      batch = batch && q.BatchWait();
      if (!thread_error) thread_error = q.thread_error.load();
      per.Set(static_cast<uint32_t>(i), Napi::Number::New(env, static_cast<double>(q.requests.load())));
    }
  }
  o.Set("queueRequests", per);
  o.Set("coopTaskrun", Napi::Boolean::New(env, coop));
  // The batched wait in force on every queue: completions waited for and the bound (µs); 1 and 0
  // when off (not asked for, or a kernel before 6.12), or not serving yet.
  n("batchWait", batch ? s->batch_wait : 1);
  n("batchWaitUs", batch ? s->batch_wait_us : 0);
  o.Set("running", Napi::Boolean::New(env, running));
  o.Set("threadError", Napi::Number::New(env, thread_error));
  o.Set("cacheError", Napi::Number::New(env, s->cache_error.load()));
  return o;
}

// Arguments (handle, first, count, bits) of ublkAccessed / ublkEvict: a range and its bitmap (at
// least count bits), checked against `limit` (units or blocks).
bool RangeArgs(const Napi::CallbackInfo& info, Server* s, uint64_t limit, uint64_t* first, uint64_t* count, Bytes* bits) {
  int64_t f, c;
  if (!ArgInt64(info, 1, &f) || !ArgInt64(info, 2, &c) || !ArgBytes(info, 3, bits)) return false;
  if (!s->budget) {
    ThrowErrno(info.Env(), EOPNOTSUPP, "ublk server without a budget");
    return false;
  }
  if (f < 0 || c < 0 || static_cast<uint64_t>(f + c) > limit || bits->length * 8 < static_cast<uint64_t>(c)) {
    Napi::RangeError::New(info.Env(), "range").ThrowAsJavaScriptException();
    return false;
  }
  *first = static_cast<uint64_t>(f);
  *count = static_cast<uint64_t>(c);
  return true;
}

// ublkAccessed(handle, first, count, bits) -> set: the accessed bits of units [first, first +
// count) into `bits` (ORed in), cleared in the server. EOPNOTSUPP without a budget.
Napi::Value Accessed(const Napi::CallbackInfo& info) {
  Server* s = ServerOf(info);
  uint64_t first, count;
  Bytes bits;
  if (!s || !RangeArgs(info, s, s->accessed.size() * 64, &first, &count, &bits)) return Napi::Value();
  return Napi::Number::New(info.Env(), static_cast<double>(s->TakeAccessed(first, count, bits.data)));
}

// ublkEvict(handle, first, count, bits) -> evicted: Server::Evict (blocks the JS thread until no
// hit read is in flight on the evicted blocks: the queue threads' reads of the cache file).
Napi::Value Evict(const Napi::CallbackInfo& info) {
  Server* s = ServerOf(info);
  uint64_t first, count;
  Bytes bits;
  if (!s || !RangeArgs(info, s, s->blocks, &first, &count, &bits)) return Napi::Value();
  uint64_t n = s->Evict(first, count, bits.data);
  if (n == ~0ULL) {
    ThrowErrno(info.Env(), ETIMEDOUT, "ublk evict: hit reads still in flight after 60 s; nothing evicted");
    return Napi::Value();
  }
  return Napi::Number::New(info.Env(), static_cast<double>(n));
}

// ublkClaim(handle, first, count, bits) -> id: Server::Claim (the claimed blocks set in `bits`,
// which the caller zeroed; 0: none free). EAGAIN: 64 claims outstanding; EOPNOTSUPP without a
// budget; RangeError past the last block or past 8192 blocks.
Napi::Value ClaimBlocks(const Napi::CallbackInfo& info) {
  Server* s = ServerOf(info);
  uint64_t first, count;
  Bytes bits;
  if (!s || !RangeArgs(info, s, s->blocks, &first, &count, &bits)) return Napi::Value();
  if (count > Server::kMaxClaimBlocks) {
    Napi::RangeError::New(info.Env(), "count").ThrowAsJavaScriptException();
    return Napi::Value();
  }
  int64_t id = s->Claim(first, count, bits.data);
  if (id < 0) {
    ThrowErrno(info.Env(), static_cast<int>(-id), "ublk claim: 64 claims outstanding");
    return Napi::Value();
  }
  return Napi::Number::New(info.Env(), static_cast<double>(id));
}

// ublkFilled(handle, id, first, count, bits): Server::Filled. ENOENT, EINVAL as it says.
Napi::Value FilledBlocks(const Napi::CallbackInfo& info) {
  Server* s = ServerOf(info);
  int64_t id, f, c;
  Bytes bits;
  if (!s || !ArgInt64(info, 1, &id) || !ArgInt64(info, 2, &f) || !ArgInt64(info, 3, &c) || !ArgBytes(info, 4, &bits)) return Napi::Value();
  if (id <= 0 || f < 0 || c < 0 || bits.length * 8 < static_cast<uint64_t>(c)) {
    Napi::RangeError::New(info.Env(), "range").ThrowAsJavaScriptException();
    return Napi::Value();
  }
  int e = s->Filled(static_cast<uint64_t>(id), static_cast<uint64_t>(f), static_cast<uint64_t>(c), bits.data);
  if (e < 0) ThrowErrno(info.Env(), -e, e == -ENOENT ? "ublk filled: no such claim" : "ublk filled: not the claim's range or blocks");
  return Napi::Value();
}

// ublkEvictDone(handle, first, count): Server::EvictDone.
Napi::Value EvictDone(const Napi::CallbackInfo& info) {
  Server* s = ServerOf(info);
  int64_t first, count;
  if (!s || !ArgInt64(info, 1, &first) || !ArgInt64(info, 2, &count)) return Napi::Value();
  if (!s->budget) {
    ThrowErrno(info.Env(), EOPNOTSUPP, "ublk server without a budget");
    return Napi::Value();
  }
  if (static_cast<uint64_t>(first + count) > s->blocks) {
    Napi::RangeError::New(info.Env(), "range").ThrowAsJavaScriptException();
    return Napi::Value();
  }
  s->EvictDone(static_cast<uint64_t>(first), static_cast<uint64_t>(count));
  return info.Env().Undefined();
}

// ublkGrant(handle, n) -> unasked: Server::Grant.
Napi::Value Grant(const Napi::CallbackInfo& info) {
  Server* s = ServerOf(info);
  int64_t n;
  if (!s || !ArgInt64(info, 1, &n)) return Napi::Value();
  if (!s->budget) {
    ThrowErrno(info.Env(), EOPNOTSUPP, "ublk server without a budget");
    return Napi::Value();
  }
  return Napi::Number::New(info.Env(), static_cast<double>(s->Grant(static_cast<uint64_t>(n))));
}

// ublkCredit(handle, limit) -> { limit, unasked }: Server::Credit; limit -1: none.
Napi::Value Credit(const Napi::CallbackInfo& info) {
  Server* s = ServerOf(info);
  if (!s) return Napi::Value();
  double d = info[1].IsNumber() ? info[1].As<Napi::Number>().DoubleValue() : -2;
  int64_t limit = static_cast<int64_t>(d);
  if (!(d >= -1 && d <= kMaxSafeInteger) || static_cast<double>(limit) != d) {
    Napi::RangeError::New(info.Env(), "limit").ThrowAsJavaScriptException();
    return Napi::Value();
  }
  uint64_t unasked = s->Credit(limit);
  Napi::Object o = Napi::Object::New(info.Env());
  o.Set("limit", Napi::Number::New(info.Env(), static_cast<double>(limit)));
  o.Set("unasked", Napi::Number::New(info.Env(), static_cast<double>(unasked)));
  return o;
}

// ublkTestHook(handle, op, first, end) -> boolean: the block-state steps the queue threads take,
// under the lock, for unit tests without a device. "dirty": an answered INTENT (MarkDirty);
// "needs-preserve": would a write to [first, end) preserve first (InSnapshot); "write-begin" and
// "write-end": a native write in flight on slot 0; "dirty-mid-copy": the next EpochBegin runs
// "dirty" between opening the epoch and copying the dirty bitmap.
Napi::Value TestHook(const Napi::CallbackInfo& info) {
  Server* s = ServerOf(info);
  int64_t first, end;
  if (!s || !info[1].IsString() || !ArgInt64(info, 2, &first) || !ArgInt64(info, 3, &end)) return Napi::Value();
  if (first < 0 || end < first || static_cast<uint64_t>(end) > s->blocks) {
    Napi::RangeError::New(info.Env(), "blocks").ThrowAsJavaScriptException();
    return Napi::Value();
  }
  std::string op = info[1].As<Napi::String>().Utf8Value();
  uint64_t f = static_cast<uint64_t>(first), e = static_cast<uint64_t>(end);
  std::lock_guard<std::mutex> g(s->mu);
  bool r = false;
  if (s->writing.empty()) s->writing.assign(1, {0, 0});
  if (s->held.size() < 2) s->held.assign(2, {0, 0});
  if (s->miss_wait.size() < 2) s->miss_wait.assign(2, 0), s->miss_stale.assign(2, 0);
  if (op == "dirty") s->MarkDirty(f, e);
  else if (op == "needs-preserve") r = s->InSnapshot(f, e);
  else if (op == "write-begin") {
    if (s->epoch_open) s->Touch(f, e);
    s->writing[0] = {f, e};
  } else if (op == "write-end") s->writing[0] = {0, 0};
  else if (op == "dirty-mid-copy") s->test_mid_copy = {f, e};
  else if (op == "hold") s->held[0] = {f, e};
  else if (op == "unhold") s->held[0] = {0, 0};
  else if (op == "miss-wait0" || op == "miss-wait1") {
    // A read of slot 0 or 1 holds [first, end) and waits for its MISS (kReadMiss).
    size_t k = op == "miss-wait1";
    s->held[k] = {f, e};
    s->miss_wait[k] = ++s->miss_seq;
    s->miss_stale[k] = 0;
  } else if (op == "miss-answer0" || op == "miss-answer1") {
    // Its MISS is answered: true if it must miss again (stale); the slot lets go.
    size_t k = op == "miss-answer1";
    r = s->miss_stale[k];
    s->held[k] = {0, 0};
    s->miss_wait[k] = 0;
    s->miss_stale[k] = 0;
  }
  else if (op == "parks") r = s->Held(f, e) || s->Evicting(f, e);  // would a request on [first, end) wait (Start)
  else if (op == "hit") {
    // A read hit as queue 0 begins it (BeginHit); it ends with "hit-end-in".
    bool counted = false;
    r = s->BeginHit(0, f, e, &s->test_hit_phase, &counted);
  } else if (op == "hit-end-in") {
    // The last "hit" completes `end` ms from now, on another thread (as a queue thread would).
    auto* a = new std::pair<Server*, uint64_t>(s, e << 8 | s->test_hit_phase);
    pthread_t th;
    if (pthread_create(&th, nullptr, [](void* p) -> void* {
          auto* x = static_cast<std::pair<Server*, uint64_t>*>(p);
          usleep(static_cast<useconds_t>((x->second >> 8) * 1000));
          x->first->hit_reads[0].n[x->second & 1].fetch_sub(1, std::memory_order_release);
          delete x;
          return nullptr;
        }, a) == 0)
      pthread_detach(th);
    else
      delete a;
  } else if (op == "take-credit") {
    // A write's credit step over [first, end) (TakeCredit): true when it must ask for ROOM.
    uint64_t n = 0;
    r = s->TakeCredit(f, e, 0, &n) != 0;
  } else if (op == "take-credit-granted") {
    // The same step of a write whose ROOM for end - first blocks was granted (Grant).
    uint64_t n = 0;
    r = s->TakeCredit(f, e, e - f, &n) != 0;
  } else if (op == "intent-answered") {
    // The INTENT of a write that counted end - first blocks in the credit was answered.
    s->unasked -= std::min<uint64_t>(s->unasked, e - f);
  } else {
    Napi::RangeError::New(info.Env(), "op").ThrowAsJavaScriptException();
    return Napi::Value();
  }
  return Napi::Boolean::New(info.Env(), r);
}

}  // namespace

bool InitUblk(Napi::Env env, Napi::Object exports) {
  return Export<Create>(env, exports, "ublkCreate") && Export<Start>(env, exports, "ublkStart") &&
         Export<Stop>(env, exports, "ublkStop") && Export<Reply>(env, exports, "ublkReply") &&
         Export<EpochBegin>(env, exports, "ublkEpochBegin") && Export<EpochCommit>(env, exports, "ublkEpochCommit") &&
         Export<Query>(env, exports, "ublkQuery") && Export<TestHook>(env, exports, "ublkTestHook") &&
         Export<Accessed>(env, exports, "ublkAccessed") && Export<Evict>(env, exports, "ublkEvict") && Export<Credit>(env, exports, "ublkCredit") &&
         Export<EvictDone>(env, exports, "ublkEvictDone") && Export<Grant>(env, exports, "ublkGrant") &&
         Export<ClaimBlocks>(env, exports, "ublkClaim") && Export<FilledBlocks>(env, exports, "ublkFilled");
}

}  // namespace ulob
