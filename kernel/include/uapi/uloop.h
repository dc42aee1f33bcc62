/* SPDX-License-Identifier: GPL-2.0-only WITH Linux-syscall-note */
/*
 * uloop: the ABI between uloop.ko and its daemon (ulobdev). The one definition, included by the
 * module and by native/uloop.cc. Fixed-width types, explicit padding, every struct a multiple of
 * 8 bytes. docs/design.md ("The uloop module") tells the protocol as a story; this header is the
 * reference.
 *
 * Versions and features. ULOOP_ABI_VERSION names the layout of the structs below; a module
 * refuses ADD and ATTACH from a daemon built for another one (EPROTO, and a log line naming both).
 * Everything a module can do beyond the layout is a feature bit returned by
 * ULOOP_IOC_GET_FEATURES, which works on any control fd whatever the daemon's version. New
 * behaviours are off until the daemon asks for them with a ULOOP_F_* flag at ADD: a field or flag
 * left zero means what version 1 did. Reserved fields must be zero (EOPNOTSUPP otherwise), so a
 * later module can give them a meaning.
 *
 * /dev/uloop-control (0600). A daemon opens it and either ADDs a device (the fd is then attached
 * to it) or ATTACHes to an existing one. The attached fd is the request channel: read() returns
 * whole struct uloop_msg records (poll()/O_NONBLOCK supported), write() takes whole struct
 * uloop_reply records. Closing the fd detaches; the device stays, and the upcalls the daemon had
 * not answered are re-issued to the next daemon that ATTACHes within reattach_timeout_s (module
 * parameter, 30 s), else they fail with EIO. Every request also fails with EIO once it has waited
 * io_timeout_s (module parameter, 90 s, taken at ADD; 0: never) for the daemon, attached or not.
 *
 * Blocks and bits. The device is cut into cache blocks of block_size bytes; block b covers bytes
 * [b * block_size, (b + 1) * block_size). The kernel keeps, per block:
 *   present  the cache file holds the block's content: reads and writes are served from it;
 *   dirty    the content differs from the backing disk (the daemon has it recorded durably, or
 *            the block is pending: see BARRIER).
 * present and not dirty is "clean"; dirty and not present exists only with ULOOP_F_ZERO (a block
 * zeroed by a ZERO upcall: it reads as zeros, and the cache file need not hold it).
 * Bitmaps exchanged with the daemon are one bit per block (or per unit, for ACCESSED), bit b is
 * byte b / 8, bit b % 8 (LSB first), as in the cache's bitmap file; a whole-device bitmap is
 * ceil(nr_blocks / 8) bytes. Block numbers are 64-bit everywhere.
 *
 * Errors. Every refused ioctl returns one errno that names the reason (listed at each ioctl) and
 * writes one line to the kernel log (ratelimited) saying what was wrong.
 */
#ifndef _UAPI_ULOOP_H
#define _UAPI_ULOOP_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define ULOOP_ABI_VERSION 2
#define ULOOP_CONTROL_NAME "uloop-control"
#define ULOOP_INDEX_ANY 0xffffffffU
#define ULOOP_MAX_BLOCKS (1ULL << 36)       /* 256 TiB at 4 KiB blocks */
#define ULOOP_MAX_RANGE_BLOCKS (1U << 16)   /* CLAIM and EVICT: blocks per call */

/* ---- ULOOP_IOC_GET_FEATURES ------------------------------------------------------------------ */

#define ULOOP_FEAT_COUNTERS      (1ULL << 0)  /* QUERY's counters (uloop_info after `waiting`) */
#define ULOOP_FEAT_STICKY_ERROR  (1ULL << 1)  /* a failed cache-file sync sticks; CLEAR_ERROR */
#define ULOOP_FEAT_IO_TIMEOUT    (1ULL << 2)  /* requests fail after io_timeout_s */
#define ULOOP_FEAT_PRESERVE      (1ULL << 3)  /* ULOOP_F_PRESERVE, PRESERVE upcalls, EPOCH_RELEASE */
#define ULOOP_FEAT_ZERO          (1ULL << 4)  /* ULOOP_F_ZERO, ZERO upcalls */
#define ULOOP_FEAT_CLAIM         (1ULL << 5)  /* CLAIM / FILLED (hydration) */
#define ULOOP_FEAT_EVICT         (1ULL << 6)  /* EVICT */
#define ULOOP_FEAT_ACCESSED      (1ULL << 7)  /* ULOOP_F_ACCESSED, ACCESSED */
#define ULOOP_FEAT_PARTITIONS    (1ULL << 8)  /* /dev/uloopNpM; ULOOP_F_PARTSCAN */
#define ULOOP_FEAT_SECTOR_SIZE   (1ULL << 9)  /* logical_block_size / physical_block_size at ADD */
#define ULOOP_FEAT_REPLY_CHECK   (1ULL << 10) /* replies to unknown ids fail (ENOENT) */
#define ULOOP_FEAT_CREDIT        (1ULL << 11) /* CREDIT, ROOM upcalls, QUERY's unasked_blocks */
#define ULOOP_FEAT_BARRIER       (1ULL << 12) /* BARRIER; EVICT's ULOOP_EVICT_F_PINNED; ROOM's count */

struct uloop_features {
	__u32 version;       /* out: the module's ULOOP_ABI_VERSION */
	__u32 max_part;      /* out: partitions per device with their own minor (module parameter) */
	__u64 features;      /* out: ULOOP_FEAT_* */
	__u32 max_devices;   /* out: indexes 0 .. max_devices - 1 */
	__u32 io_timeout_s;  /* out: the module parameter now (applies to devices added later) */
	__u64 max_blocks;    /* out: ULOOP_MAX_BLOCKS */
	__u64 __reserved[4];
};

/* ---- ULOOP_IOC_ADD ------------------------------------------------------------------------------ */

#define ULOOP_F_WRITEBACK (1U << 0) /* writes allowed; without it the device is read-only */
/*
 * Point-in-time flush epochs: between EPOCH_BEGIN and the epoch's end, the first change to a block
 * of the epoch's snapshot (dirty at BEGIN) waits for a PRESERVE upcall, unless the daemon has
 * released it (EPOCH_RELEASE). Needs ULOOP_F_WRITEBACK.
 */
#define ULOOP_F_PRESERVE  (1U << 1)
/*
 * DISCARD and WRITE_ZEROES: the device advertises both; whole blocks go to the daemon as ZERO
 * upcalls and are then dirty but not present; the parts of blocks at either end are written with
 * zeros like any write. The present bitmap given at ADD is taken as is (dirty without present
 * is a zero block); without this flag present is widened to include dirty, as in version 1.
 * Needs ULOOP_F_WRITEBACK.
 */
#define ULOOP_F_ZERO      (1U << 2)
/*
 * Set an "accessed" bit per unit of 2^unit_shift blocks on every request served but a read that
 * needed a MISS (a miss is not a use: GCLOCK's probation); see ACCESSED.
 */
#define ULOOP_F_ACCESSED  (1U << 3)
/*
 * Scan the partition table once the daemon can answer: after ADD returns, a kernel work item reads
 * it (its misses are ordinary MISS upcalls). Without it partitions appear only on request
 * (BLKRRPART, as `blockdev --rereadpt`, or BLKPG, as partx). REMOVE is refused (EBUSY) while a
 * scan runs.
 */
#define ULOOP_F_PARTSCAN  (1U << 4)
#define ULOOP_F_ALL (ULOOP_F_WRITEBACK | ULOOP_F_PRESERVE | ULOOP_F_ZERO | ULOOP_F_ACCESSED | \
		     ULOOP_F_PARTSCAN)

/*
 * ADD: create /dev/uloopN over the cache file and attach the calling fd to it as its daemon. The
 * device is published (findable by QUERY, ATTACH, REMOVE) only once it is complete.
 * Refusals: EFAULT (struct or bitmap unreadable), EPROTO (version), EOPNOTSUPP (unknown flag,
 * non-zero reserved field, a flag without the ULOOP_F_WRITEBACK it needs), EISCONN (this fd is
 * already attached), EINVAL (size 0, or not a multiple of the logical block size), EDOM
 * (block_size not a power of two in 4 KiB .. 1 MiB), ERANGE (logical/physical block size or
 * unit_shift out of range), EFBIG (more than ULOOP_MAX_BLOCKS blocks), EMSGSIZE (bitmap_length
 * too short), EBADF (cache_fd not open), EBADFD (cache_fd not a regular file with read and write
 * iterators), EACCES (cache_fd not readable, or not writable with ULOOP_F_WRITEBACK), EOVERFLOW
 * (cache file shorter than size), ENXIO (index >= max_devices), EEXIST (/dev/uloopN exists),
 * ENOSPC (no free index), ENOMEM.
 */
struct uloop_add {
	__u32 version;     /* in: ULOOP_ABI_VERSION */
	__s32 cache_fd;    /* in: the cache file, regular, O_RDWR in write-back mode */
	__u64 size;        /* in: bytes, a multiple of the logical block size */
	__u32 block_size;  /* in: cache block size, a power of two, 4 KiB .. 1 MiB */
	__u32 flags;       /* in: ULOOP_F_* */
	__u64 present_ptr; /* in: user address of the present bitmap */
	__u64 dirty_ptr;   /* in: user address of the dirty bitmap */
	__u32 index;       /* in: the N wanted, or ULOOP_INDEX_ANY; out: N of /dev/uloopN */
	/* in: the device's logical block size: 512 (0 means 512), 1024, 2048 or 4096, at most
	 * block_size. Give the backing disk's, so that a filesystem made through the cache mounts
	 * on the bare disk. */
	__u32 logical_block_size;
	/* in: physical block size: a power of two from logical_block_size to block_size; 0 means
	 * max(logical_block_size, min(block_size, 4096)) */
	__u32 physical_block_size;
	__u32 unit_shift;    /* in: ULOOP_F_ACCESSED: a unit is 2^unit_shift blocks, 0 .. 20 */
	/* in: bytes readable at present_ptr and at dirty_ptr; 0: exactly ceil(nr_blocks / 8) */
	__u64 bitmap_length;
	__u64 __reserved[3];
};

/* ---- ULOOP_IOC_QUERY ------------------------------------------------------------------------------ */

#define ULOOP_STATE_EPOCH_OPEN   (1U << 0) /* between EPOCH_BEGIN and COMMIT */
#define ULOOP_STATE_EPOCH_FAILED (1U << 1) /* a PRESERVE failed: COMMIT will say ECANCELED */
#define ULOOP_STATE_SCANNING     (1U << 2) /* a ULOOP_F_PARTSCAN scan is queued or running */

/*
 * QUERY: the state of /dev/uloopN, from any control fd. Refusals: EFAULT, ENODEV (no such device,
 * or it is being added or removed). Counts are exact, kept as running counts (no scan).
 */
struct uloop_info {
	__u32 version;      /* out */
	__u32 index;        /* in */
	__u64 size;
	__u32 block_size;
	__u32 flags;        /* the ULOOP_F_* given at ADD */
	__u64 nr_blocks;
	__u64 present_blocks;
	__u64 dirty_blocks;   /* including zero blocks and pending ones */
	__u64 epoch;        /* flush epochs begun so far */
	__u32 attached;     /* 1 while a daemon's fd is attached */
	__u32 waiting;      /* upcalls queued for or sent to the daemon, not answered */
	/* ULOOP_FEAT_COUNTERS */
	__s32 error;        /* the sticky error (a negative errno) or 0: see CLEAR_ERROR */
	__u32 state;        /* ULOOP_STATE_* */
	__u64 zero_blocks;    /* dirty and not present (ZERO) */
	__u64 pending_blocks; /* written whole while missing, not yet handed over by a BARRIER */
	__u64 claimed_blocks; /* held by CLAIMs not yet FILLED */
	__u64 read_hits;      /* read requests served with no MISS upcall */
	__u64 read_misses;    /* read requests that waited for at least one MISS */
	__u64 write_hits;     /* write requests that needed no upcall */
	__u64 write_upcalls;  /* write requests that waited for a MISS, INTENT or PRESERVE */
	__u64 read_bytes;     /* bytes of read requests completed without error */
	__u64 write_bytes;    /* bytes of write requests completed without error */
	__u64 zero_bytes;     /* bytes of DISCARD / WRITE_ZEROES completed without error */
	__u64 flushes;        /* FLUSH requests (and FUA writes' flushes) completed without error */
	__u64 barriers;       /* BARRIER upcalls answered without error */
	__u64 timeouts;       /* requests failed after io_timeout_s */
	__u64 io_errors;      /* requests failed by the cache file (read, write or sync) */
	__u64 late_replies;   /* replies to upcalls that had already timed out (accepted) */
	__u64 mem_bytes;      /* kernel memory the device's block state takes now */
	__u32 inflight;       /* requests in the driver now */
	__u32 logical_block_size;
	__u32 physical_block_size;
	__u32 unit_shift;
	/* ULOOP_FEAT_CREDIT */
	__u64 unasked_blocks; /* blocks written (or being written) whole while missing that no
			       * barrier has handed over yet: pending + taken by the barrier in
			       * flight + owned by writes in flight + lost, and granted by ROOM
			       * answers not yet taken; what CREDIT limits */
	__u64 credit_limit;   /* CREDIT's limit, ULOOP_CREDIT_NONE when none is set */
	__u64 __reserved[4];
};

/* ---- ULOOP_IOC_ATTACH ---------------------------------------------------------------------------- */

/*
 * ATTACH: bind the calling fd to an existing device as its daemon; the upcalls the previous daemon
 * left unanswered are read again. Refusals: EFAULT, EPROTO (version), EOPNOTSUPP (reserved),
 * EISCONN (this fd is attached already), ENODEV (no such device, or it is being removed), EBUSY
 * (another daemon is attached).
 */
struct uloop_attach {
	__u32 version;
	__u32 index;
};

/* ---- the request channel: read() and write() on the attached fd ---------------------------------- */

enum uloop_msg_type {
	/* Fill [offset, offset + length) of the cache file from the source. Block-aligned (the last
	 * block may end at the device's end), all blocks not present. Answer once the data is written
	 * to the cache file (not necessarily synced): the kernel then sets the present bits and serves
	 * the range itself. A block dirty and not present (ULOOP_F_ZERO) is filled with zeros. */
	ULOOP_MSG_MISS = 1,
	/* The blocks [offset, offset + length) are present and clean and are about to be
	 * overwritten: persist them dirty (durability rule 3) and answer; the kernel then sets the
	 * dirty bits and writes. */
	ULOOP_MSG_INTENT = 2,
	/* A FLUSH: the kernel took the set of pending blocks (written whole while missing since the
	 * previous barrier), then synced the cache file. Fetch that set with ULOOP_IOC_BARRIER_BITS(id)
	 * while the barrier is outstanding, persist the blocks present and dirty, answer; the FLUSH
	 * completes after that. offset = 0, length = the bitmap length in bytes. On an error answer
	 * the set goes back to pending for the next FLUSH; so it does when the barrier times out, and
	 * a ZERO of one of its blocks may follow: record a block's messages in the order read (this
	 * barrier's records before a later ZERO's), or the store keeps a present bit over a hole. */
	ULOOP_MSG_BARRIER = 3,
	/* ULOOP_F_PRESERVE: the blocks [offset, offset + length), of epoch `epoch`'s snapshot, are about
	 * to change: copy their current content aside (it is the epoch's version: the flusher must
	 * write that one) and answer. The kernel holds the write until then. Answering late for an
	 * epoch that has since ended is harmless. An error answer marks the epoch failed (COMMIT:
	 * ECANCELED) and lets the write go on. */
	ULOOP_MSG_PRESERVE = 4,
	/* ULOOP_F_ZERO: the whole blocks [offset, offset + length) now read as zeros: record them
	 * durably as dirty with zero content, drop them from the cache file as you like (punch), and
	 * answer. The kernel then holds them dirty and not present; a later read sends a MISS (write
	 * zeros into the cache file), a later whole-block write makes them pending. flags: DISCARD
	 * or NOUNMAP tell which request it was. */
	ULOOP_MSG_ZERO = 5,
	/* ULOOP_FEAT_CREDIT, while a CREDIT limit is set: a write covers the missing blocks of
	 * [offset, offset + length) whole (rule 4: the kernel writes them without a MISS) and the
	 * blocks the kernel writes so without asking (QUERY's unasked_blocks) plus these would pass
	 * the limit. Make room in the cache file for length / block_size more blocks (evict, flush:
	 * the write waits meanwhile) and answer: the kernel then writes up to that many missing blocks
	 * of this request whole, over the limit if need be (the grant is the request's, once).
	 * Nothing is written to the cache file for it; the blocks are not busy while it waits (the
	 * request's next pass looks at them again). An error answer fails the write.
	 * ULOOP_FEAT_BARRIER: `epoch` carries the count of missing blocks (the range is their span
	 * and may hold present blocks); the answer grants exactly that many and raises the limit by
	 * as much in the same step (capped at the device's blocks), so that they are inside it while
	 * they stay unasked: the daemon does not raise it itself (raising it before answering let
	 * other writes take that room before the grant was counted). A ROOM still queued (not read)
	 * when the limit is lifted (ATTACH, CREDIT without a limit) ends at once with no grant and its
	 * write goes on; raising the limit ends none. */
	ULOOP_MSG_ROOM = 6,
};

#define ULOOP_MSG_F_DISCARD (1U << 0) /* ZERO: from a DISCARD (else WRITE_ZEROES) */
#define ULOOP_MSG_F_NOUNMAP (1U << 1) /* ZERO: the caller asked to keep the space allocated */

struct uloop_msg {
	__u64 id;     /* unique per device, increasing; the reply's id */
	__u32 type;   /* enum uloop_msg_type */
	__u32 flags;  /* ULOOP_MSG_F_* */
	__u64 offset; /* bytes */
	__u64 length; /* bytes */
	__u64 epoch;  /* PRESERVE: the epoch whose version to keep; ROOM: the missing blocks; else 0 */
};

/*
 * One reply per message. write() takes whole records and handles them in order; it stops at the
 * first it refuses and returns the bytes of those it took, or, if it took none, fails with:
 * EINVAL (a partial record, or error not in -4095 .. 0), ENOENT (an id never sent, not
 * outstanding or already answered; logged), ENOTCONN (not attached), ENODEV (device removed).
 * A reply to an upcall that has timed out (io_timeout_s) is accepted (late_replies): a MISS,
 * ZERO or PRESERVE the daemon had read keeps its blocks busy until then; a successful late ZERO
 * takes effect (the blocks become zero), other late answers only free the blocks. A ZERO still
 * unanswered when the daemon detaches is sent again (new id) to the next daemon, whatever the
 * reattach timeout: its blocks stay busy until that answer (or REMOVE).
 */
struct uloop_reply {
	__u64 id;
	__s32 error;  /* 0, or a negative errno that fails the request(s) waiting */
	__u32 __pad;
};

/* ---- ioctls on the attached fd (else ENOTCONN; ENODEV once the device is removed) --------------- */

/*
 * BARRIER_BITS: copy out the pending set a barrier carries, into both buffers (present and
 * dirty: the same set). Refusals: EFAULT, EMSGSIZE (length < ceil(nr_blocks / 8)), ENOENT (id is
 * not an outstanding barrier).
 */
struct uloop_barrier_bits {
	__u64 id;          /* in: the barrier's message id */
	__u64 present_ptr; /* in: buffers of `length` bytes each */
	__u64 dirty_ptr;
	__u64 length;      /* in: the buffers' length */
};

/*
 * EPOCH_BEGIN / EPOCH_COMMIT: the flusher's snapshot of the dirty set and its commit. BEGIN copies
 * the dirty bitmap to dirty_ptr and starts recording writes; COMMIT takes the blocks the flusher
 * wrote back (dirty_ptr), clears the dirty bit of each that no write touched since BEGIN (writes
 * in flight at BEGIN count as touching) and that is not pending (written whole while missing, not
 * yet recorded through a BARRIER), and returns the cleared set in place. BEGIN does not sync
 * the cache file: the daemon syncs it after BEGIN, before COMMIT, so the content it copied of a
 * block COMMIT clears is durable in the cache. A later write to a cleared block sends an INTENT.
 * A BEGIN while an epoch is open ends that one (it can no longer commit). To end an epoch without
 * clearing anything, COMMIT an empty set.
 * With ULOOP_F_PRESERVE the snapshot is also the set whose blocks are preserved (PRESERVE) before
 * they change, until EPOCH_RELEASE or the epoch's end.
 * Refusals: EFAULT, EMSGSIZE (length short), ESTALE (COMMIT: not the open epoch), ECANCELED
 * (COMMIT: a PRESERVE failed in this epoch; nothing is cleared and the epoch ends), EIO (the
 * sticky error is set; COMMIT: nothing is cleared and the epoch ends), ENOMEM.
 */
struct uloop_epoch {
	__u64 dirty_ptr;
	__u64 length;
	__u64 epoch;       /* out on BEGIN, in on COMMIT */
	__u64 cleared;     /* out on COMMIT: blocks cleared */
};

/*
 * Block ranges with a bitmap, for CLAIM, FILLED, EVICT, ACCESSED and EPOCH_RELEASE. Bit i of
 * bits_ptr (ceil(count / 8) bytes) is block (or unit) first + i. Refusals common to all: EFAULT,
 * EINVAL (first + count beyond the device, count 0 or over the ioctl's limit), EOPNOTSUPP (the
 * ADD flag it needs was not given, or reserved fields).
 */
struct uloop_blocks {
	__u64 first;     /* in: first block (ACCESSED: first unit) */
	__u64 count;     /* in: blocks (units) in the range */
	__u64 bits_ptr;  /* in/out, as each ioctl says */
	__u64 done;      /* out: bits set in the result */
	__u64 id;        /* CLAIM: out, FILLED: in; EPOCH_RELEASE: in, the epoch; EVICT: in ULOOP_EVICT_F_*, out a claim id */
	__u64 __reserved;
};

/*
 * CLAIM (hydration without overwriting): marks the blocks of the range that are neither present,
 * dirty nor busy as claimed (busy: requests touching them wait), returns them in bits_ptr and
 * their count in done, and a claim id (0 if none were free). count <= ULOOP_MAX_RANGE_BLOCKS; at
 * most 64 claims outstanding (EAGAIN). The daemon fills them in the cache file, then FILLED.
 * FILLED: ends claim `id`: the claimed blocks set in bits_ptr (the range must be the claim's)
 * become present (the daemon persists them after syncing, as after a MISS); the others are let go,
 * still missing. Refusals: ENOENT (no such claim). Claims end when the daemon detaches.
 */
/*
 * EVICT: of the blocks set in bits_ptr, those present, clean, not busy, not pending and not in the
 * range of a request still preparing (waiting for an upcall or for busy blocks: it may have had
 * them filled, and would have them filled again; with ULOOP_EVICT_F_PINNED in `id`
 * (ULOOP_FEAT_BARRIER) only those of the oldest such request: a last resort when nothing else
 * frees room, since concurrent requests can hold every clean block between them, each waiting
 * for room the others hold; the oldest then gets what it needs and ends, then the next) stop being
 * served: the call marks them busy, waits (killable) until no request is in flight on them, clears
 * their present bits, and returns them in bits_ptr (done = their count). Only then may the daemon
 * clear their present bits durably and punch the cache file there (a later read sends a MISS).
 * With ULOOP_EVICT_F_HOLD (ULOOP_FEAT_BARRIER) they stay busy as a claim (its id in `id`, 0 if
 * none was evicted) until FILLED with none set lets them go, after the punch: a write covering
 * one whole would otherwise be written without asking (rule 4) and then punched away. The claim
 * ends with the daemon (detach) as any other; EAGAIN with 64 claims outstanding (nothing evicted).
 * count <= ULOOP_MAX_RANGE_BLOCKS. Refusals: EINTR (fatal signal while waiting; nothing evicted).
 */
/*
 * ACCESSED (ULOOP_F_ACCESSED): copies the accessed bits of units [first, first + count) to
 * bits_ptr and clears them; done = how many were set. A unit's bit is set whenever a read or
 * write touching it is served.
 */
/*
 * EPOCH_RELEASE (ULOOP_F_PRESERVE): the flusher has read blocks [first, first + count) of epoch
 * `id`: writes to them need no PRESERVE any more. bits_ptr unused. Refusals: ESTALE (not the open
 * epoch).
 */

/*
 * CLEAR_ERROR: the sticky error. When a sync of the cache file fails (at a FLUSH), the cache file
 * may have lost pages written since the previous sync, and a later sync would report success over
 * them (errseq reports an error once). So the device fails every write, DISCARD/WRITE_ZEROES and
 * FLUSH with EIO from then on, QUERY shows the error, and the blocks that FLUSH's barrier would
 * have handed over, and every other block written whole while missing and not yet handed over
 * (pending; their data may be gone), are set aside; so are those pending when a sync in
 * CLEAR_ERROR fails (a retry's sync would succeed over what that one lost).
 * Reads go on. The daemon, having done what it can (its own state synced again, the cause
 * cleared), calls CLEAR_ERROR: the kernel syncs the cache file again (EIO: still failing, nothing
 * changes), waits until no request is on the set-aside blocks (new ones wait for the drop; one
 * waiting for the daemon ends with its answer or io_timeout_s; a fatal signal: EINTR, nothing
 * dropped), drops them (not present, not dirty: reads go to the source again,
 * as for any write lost before a FLUSH) and returns them in dropped_ptr (if non-zero, `length`
 * bytes), clears the error, and serves writes again. Blocks that were dirty before keep their
 * dirty bit and whatever content the cache file now holds. Refusals: EFAULT, EMSGSIZE, EIO,
 * EINTR.
 * With no error set it does nothing and returns 0.
 */
struct uloop_clear_error {
	__s32 error;       /* out: the error that was cleared, or 0 */
	__u32 __pad;
	__u64 dropped;     /* out: blocks dropped */
	__u64 dropped_ptr; /* in: 0, or a buffer of `length` bytes for the dropped blocks */
	__u64 length;
};

/* ---- ULOOP_IOC_CREDIT (ULOOP_FEAT_CREDIT) ---------------------------------------------------------- */

/*
 * CREDIT: how many blocks the kernel may write whole while missing without asking (rule 4), so
 * that a daemon with a budget bounds the cache file. The kernel counts its unasked blocks:
 * pending (written whole while missing, for the next BARRIER), taken by the barrier in flight,
 * owned by writes in flight, lost (a failed sync's, until CLEAR_ERROR), and granted by ROOM
 * answers to writes that have not taken them yet. With ULOOP_CREDIT_F_LIMIT
 * a write whose missing blocks would take that count past `limit` sends a ROOM upcall first;
 * without it there is no limit (the default, and what ATTACH resets to: a daemon that sets a
 * limit sets it after each ATTACH). Lowering the limit below the count changes nothing already
 * written: later writes ask until barriers bring the count down. On the attached fd only.
 * Refusals: EFAULT, EINVAL (unknown flags, a limit above the device's blocks, a limit without
 * ULOOP_CREDIT_F_LIMIT), EOPNOTSUPP (reserved fields set), ENOTCONN (not attached).
 */
#define ULOOP_CREDIT_F_LIMIT (1U << 0)
#define ULOOP_CREDIT_NONE (~0ULL)
struct uloop_credit {
	__u64 limit;     /* in: blocks (ULOOP_CREDIT_F_LIMIT); out: the limit now set */
	__u32 flags;     /* in: ULOOP_CREDIT_F_* */
	__u32 __pad;
	__u64 unasked;   /* out: the unasked blocks now (as QUERY's unasked_blocks) */
	__u64 __reserved[2];
};

/* ---- ULOOP_IOC_BARRIER (ULOOP_FEAT_BARRIER) ---------------------------------------------------- */

/*
 * BARRIER: what a FLUSH does to the blocks written whole while missing (pending), asked by the
 * daemon and without any page cache: takes the pending set, syncs the cache file, and if it took
 * anything sends a BARRIER upcall and waits for its answer (the daemon must answer it from
 * another thread than the one in this call); one barrier at a time with FLUSHes. A FLUSH of the
 * device (fsync of /dev/uloopN) writes back the device's page cache first, and with a CREDIT
 * limit those writes can wait for a ROOM the daemon answers only after its barrier: this call
 * never waits on a write. Returns the blocks handed over in `taken` (0: nothing was pending).
 * The wait is killable (EINTR: the set stays pending). On the attached fd only.
 * Refusals: EFAULT, EINVAL (flags set: none are defined), EOPNOTSUPP (reserved fields set),
 * ENOTCONN, EIO (the sticky error, a failed sync of the cache file, or the daemon answered the
 * barrier with an error: the set stays pending), EINTR.
 */
struct uloop_barrier {
	__u32 flags;     /* in: 0 */
	__u32 __pad;
	__u64 taken;     /* out: blocks handed over */
	__u64 __reserved[2];
};

#define ULOOP_EVICT_F_PINNED (1ULL << 0) /* EVICT (in `id`): also blocks of requests preparing */
#define ULOOP_EVICT_F_HOLD   (1ULL << 1) /* EVICT (in `id`): the evicted blocks stay busy as a claim */

#define ULOOP_IOC_MAGIC 0x75 /* 'u' */
#define ULOOP_IOC_ADD           _IOWR(ULOOP_IOC_MAGIC, 0x00, struct uloop_add)
/* REMOVE: refusals ENODEV (no such device, or being added/removed), EBUSY (open, or its open
 * mutex held: a scan or an open in progress; try again), EFAULT. Teardown: docs/design.md. */
#define ULOOP_IOC_REMOVE        _IOW(ULOOP_IOC_MAGIC, 0x01, __u32)
#define ULOOP_IOC_QUERY         _IOWR(ULOOP_IOC_MAGIC, 0x02, struct uloop_info)
#define ULOOP_IOC_ATTACH        _IOW(ULOOP_IOC_MAGIC, 0x03, struct uloop_attach)
#define ULOOP_IOC_BARRIER_BITS  _IOW(ULOOP_IOC_MAGIC, 0x04, struct uloop_barrier_bits)
#define ULOOP_IOC_EPOCH_BEGIN   _IOWR(ULOOP_IOC_MAGIC, 0x05, struct uloop_epoch)
#define ULOOP_IOC_EPOCH_COMMIT  _IOWR(ULOOP_IOC_MAGIC, 0x06, struct uloop_epoch)
#define ULOOP_IOC_GET_FEATURES  _IOR(ULOOP_IOC_MAGIC, 0x07, struct uloop_features)
#define ULOOP_IOC_CLEAR_ERROR   _IOWR(ULOOP_IOC_MAGIC, 0x08, struct uloop_clear_error)
#define ULOOP_IOC_CLAIM         _IOWR(ULOOP_IOC_MAGIC, 0x09, struct uloop_blocks)
#define ULOOP_IOC_FILLED        _IOWR(ULOOP_IOC_MAGIC, 0x0a, struct uloop_blocks)
#define ULOOP_IOC_EVICT         _IOWR(ULOOP_IOC_MAGIC, 0x0b, struct uloop_blocks)
#define ULOOP_IOC_ACCESSED      _IOWR(ULOOP_IOC_MAGIC, 0x0c, struct uloop_blocks)
#define ULOOP_IOC_EPOCH_RELEASE _IOW(ULOOP_IOC_MAGIC, 0x0d, struct uloop_blocks)
#define ULOOP_IOC_CREDIT        _IOWR(ULOOP_IOC_MAGIC, 0x0e, struct uloop_credit)
#define ULOOP_IOC_BARRIER       _IOWR(ULOOP_IOC_MAGIC, 0x0f, struct uloop_barrier)

#endif /* _UAPI_ULOOP_H */
