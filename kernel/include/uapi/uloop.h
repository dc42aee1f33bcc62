/* SPDX-License-Identifier: GPL-2.0-only WITH Linux-syscall-note */
/*
 * uloop: the ABI between uloop.ko and its daemon (ulobdev). The one definition, included by the
 * module and by native/uloop.cc. Fixed-width types, explicit padding, every struct a multiple of
 * 8 bytes; ULOOP_ABI_VERSION is checked on ADD and ATTACH and bumped on any incompatible change.
 *
 * /dev/uloop-control (0600). A daemon opens it and either ADDs a device (the fd is then attached
 * to it) or ATTACHes to an existing one. The attached fd is the request channel: read() returns
 * whole struct uloop_msg records (poll()/O_NONBLOCK supported), write() takes whole struct
 * uloop_reply records. Closing the fd detaches; the device stays, and requests the daemon had
 * not answered are re-issued to the next daemon that ATTACHes within the timeout (module
 * parameter reattach_timeout_s), else they fail with EIO.
 *
 * Bitmaps are one bit per cache block, bit b is byte b/8, bit b%8 (LSB first), as in the
 * cache's bitmap file; their length is ceil(nr_blocks / 8) bytes.
 */
#ifndef _UAPI_ULOOP_H
#define _UAPI_ULOOP_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define ULOOP_ABI_VERSION 1
#define ULOOP_CONTROL_NAME "uloop-control"
#define ULOOP_INDEX_ANY 0xffffffffU

/* uloop_add.flags */
#define ULOOP_F_WRITEBACK (1U << 0) /* writes allowed; without it the disk is read-only */

/* ADD: create /dev/uloopN over the cache file, attach the calling fd to it. */
struct uloop_add {
	__u32 version;     /* in: ULOOP_ABI_VERSION */
	__s32 cache_fd;    /* in: the cache file, regular, O_RDWR in write-back mode */
	__u64 size;        /* in: bytes, a multiple of 512 */
	__u32 block_size;  /* in: cache block size, a power of two, 4 KiB .. 1 MiB */
	__u32 flags;       /* in: ULOOP_F_* */
	__u64 present_ptr; /* in: user address of the present bitmap */
	__u64 dirty_ptr;   /* in: user address of the dirty bitmap (dirty implies present) */
	__u32 index;       /* in: the N wanted, or ULOOP_INDEX_ANY; out: N of /dev/uloopN */
	__u32 __pad;
};

/* QUERY: the state of /dev/uloopN. */
struct uloop_info {
	__u32 version;      /* out */
	__u32 index;        /* in */
	__u64 size;
	__u32 block_size;
	__u32 flags;
	__u64 nr_blocks;
	__u64 present_blocks;
	__u64 dirty_blocks;
	__u64 epoch;        /* flush epochs begun so far */
	__u32 attached;     /* 1 while a daemon's fd is attached */
	__u32 waiting;      /* requests queued for or sent to the daemon */
};

/* ATTACH: bind the calling fd to an existing device as its daemon (refused if one is). */
struct uloop_attach {
	__u32 version;
	__u32 index;
};

/* Messages to the daemon (read()). */
enum uloop_msg_type {
	/* Fill [offset, offset + length) of the cache file from the source. Block-aligned, all
	 * blocks missing. Answered once the data is written to the cache file (not necessarily
	 * synced): the kernel then sets the present bits and serves the range itself. */
	ULOOP_MSG_MISS = 1,
	/* The blocks [offset, offset + length) (byte range, block-aligned) are present and clean
	 * and are about to be overwritten: persist them dirty (durability rule 3) and answer. */
	ULOOP_MSG_INTENT = 2,
	/* The cache file has been synced. Fetch the bits set since the previous barrier with
	 * ULOOP_IOC_BARRIER_BITS(id), persist them (present, and dirty), answer. length = the
	 * bitmap length in bytes. */
	ULOOP_MSG_BARRIER = 3,
};

struct uloop_msg {
	__u64 id;     /* unique per device while outstanding */
	__u32 type;   /* enum uloop_msg_type */
	__u32 __pad;
	__u64 offset;
	__u64 length;
};

struct uloop_reply {
	__u64 id;
	__s32 error;  /* 0, or a negative errno that fails the request */
	__u32 __pad;
};

/* BARRIER_BITS: copy out the bits a barrier carries. */
struct uloop_barrier_bits {
	__u64 id;          /* in: the barrier's message id */
	__u64 present_ptr; /* in: buffers of ceil(nr_blocks / 8) bytes each */
	__u64 dirty_ptr;
	__u64 length;      /* in: the buffers' length */
};

/* EPOCH_BEGIN / EPOCH_COMMIT: the flusher's snapshot of the dirty set and its commit. BEGIN copies
 * the dirty bitmap to dirty_ptr and starts recording writes; COMMIT takes the blocks the flusher
 * wrote back (dirty_ptr), clears the dirty bit of each that no write touched since BEGIN (writes
 * in flight at BEGIN count as touching) and returns the cleared set in place. BEGIN does not sync
 * the cache file: the daemon syncs it after BEGIN, before COMMIT, so the content it copied of a
 * block COMMIT clears is durable in the cache. A later write to a cleared block sends an INTENT. */
struct uloop_epoch {
	__u64 dirty_ptr;
	__u64 length;
	__u64 epoch;       /* out on BEGIN, in on COMMIT */
	__u64 cleared;     /* out on COMMIT: blocks cleared */
};

#define ULOOP_IOC_MAGIC 0x75 /* 'u' */
#define ULOOP_IOC_ADD          _IOWR(ULOOP_IOC_MAGIC, 0x00, struct uloop_add)
#define ULOOP_IOC_REMOVE       _IOW(ULOOP_IOC_MAGIC, 0x01, __u32)
#define ULOOP_IOC_QUERY        _IOWR(ULOOP_IOC_MAGIC, 0x02, struct uloop_info)
#define ULOOP_IOC_ATTACH       _IOW(ULOOP_IOC_MAGIC, 0x03, struct uloop_attach)
#define ULOOP_IOC_BARRIER_BITS _IOW(ULOOP_IOC_MAGIC, 0x04, struct uloop_barrier_bits)
#define ULOOP_IOC_EPOCH_BEGIN  _IOWR(ULOOP_IOC_MAGIC, 0x05, struct uloop_epoch)
#define ULOOP_IOC_EPOCH_COMMIT _IOWR(ULOOP_IOC_MAGIC, 0x06, struct uloop_epoch)

#endif /* _UAPI_ULOOP_H */
