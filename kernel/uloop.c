// SPDX-License-Identifier: GPL-2.0-only
/*
 * uloop: a block device over a cache file, for ulobdev. Hits (present blocks) are served here from
 * the cache file; misses, dirty intents, flush barriers, point-in-time preserves and zeroing go to
 * a userspace daemon as upcalls over a poll()-able fd. Mechanism only: the daemon decides where
 * data comes from, what is persisted, what is evicted and when to flush. The ABI and the protocol
 * are include/uapi/uloop.h; docs/design.md tells the story and the race arguments.
 *
 * Objects and lifetimes:
 *  - struct uloop_dev: created by ULOOP_IOC_ADD and published in the idr only once complete;
 *    REMOVE hides it from the idr (the index stays reserved), fails its upcalls, then tears down
 *    disk, workqueue, tag set, index, cache file in that order. Its memory is refcounted (kref):
 *    the idr holds one reference, an attached daemon fd another; the last put frees the block
 *    state. Each device pins the module (__module_get on ADD, module_put on REMOVE).
 *  - struct uloop_cmd: blk-mq's per-request pdu (as loop's loop_cmd); owned by blk-mq, valid from
 *    queue_rq to blk_mq_end_request. queue_rq puts it on dev->rq_list; the device's one rq_work
 *    drains that list, serving what needs no daemon inline and giving each other request its own
 *    work item (cmd->work); what must run after its cache-file I/O in process context (the state
 *    of blocks a write filled, a FUA flush) runs as cmd->done_work.
 *  - struct uloop_upcall: a message to the daemon, on the stack of the work item waiting for it.
 *    It is on dev->queued (not read yet) or dev->sent (read, not answered) while `listed`; whoever
 *    takes it off the list (a reply, the request's timeout, no daemon in time, device removal)
 *    sets its error and completes it.
 *  - struct uloop_claim: blocks a daemon claimed for hydration (CLAIM), until FILLED or detach.
 *  - struct uloop_conn: file->private_data of an open /dev/uloop-control; freed on release.
 *
 * Locking: dev->lock (a mutex: every user is in process context, so no bitmap work ever runs with
 * interrupts off, and long operations can cond_resched) guards the block state, the upcall lists,
 * the epoch and the claims. dev->inflight_lock (spinlock, irqsave) guards only dev->inflight, which
 * a direct-I/O completion updates from interrupt context. Order: uloop_ctl_mutex -> disk
 * open_mutex (trylock only); conn->lock -> uloop_ctl_mutex; epoch_mutex or bar_bits_mutex ->
 * dev->lock -> inflight_lock. Nothing copies to or from user memory with dev->lock held, and every
 * allocation made with it held is GFP_NOIO (we are on the I/O path of a block device).
 */
#include <linux/bitmap.h>
#include <linux/blk-mq.h>
#include <linux/blkdev.h>
#include <linux/err.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/idr.h>
#include <linux/kref.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/poll.h>
#include <linux/sched/mm.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/uio.h>
#include <linux/version.h>
#include <linux/vmalloc.h>
#include <linux/wait.h>
#include <linux/workqueue.h>

#include "uapi/uloop.h"

#if defined(__BIG_ENDIAN)
#error "uloop: the bitmap ABI (LSB-first bytes) is copied word-wise, which assumes little-endian"
#endif

static unsigned int reattach_timeout_s = 30;
module_param(reattach_timeout_s, uint, 0644);
MODULE_PARM_DESC(reattach_timeout_s, "seconds upcalls wait for a daemon to re-attach before their requests fail with EIO");

static unsigned int io_timeout_s = 90;
module_param(io_timeout_s, uint, 0644);
MODULE_PARM_DESC(io_timeout_s, "seconds a request may wait for the daemon before it fails with EIO, 0: no limit (taken at ADD)");

static unsigned int max_part = 15;
module_param(max_part, uint, 0444);
MODULE_PARM_DESC(max_part, "partitions per device with a minor of their own (more get dynamic minors)");

#define ULOOP_MAX_BATCH 64        /* messages per read() */
#define ULOOP_MAX_CLAIMS 64       /* CLAIMs outstanding per device */
#define ULOOP_EXPIRED_IDS 256     /* timed-out ids (holding no blocks) remembered for late replies */
#define ULOOP_MAX_UNIT_BITS (1ULL << 29)  /* accessed bitmap: 64 MiB */
#define ULOOP_MAX_ZERO_SECTORS (1U << 21) /* 1 GiB per DISCARD / WRITE_ZEROES request */
#define ULOOP_MAX_RQ_SECTORS 2048  /* max_hw_sectors: 1 MiB per read or write */
/* blocks one read or write can touch: 1 MiB of 4 KiB blocks, unaligned (a zero_part: 2) */
#define ULOOP_MAX_RQ_BLOCKS ((ULOOP_MAX_RQ_SECTORS << SECTOR_SHIFT) / 4096 + 1)

static int uloop_major;
static int part_shift;
static DEFINE_IDR(uloop_idr);
static DEFINE_MUTEX(uloop_ctl_mutex); /* the idr */
static unsigned long *uloop_zeros, *uloop_ones; /* one page each, read-only after init */

/* ---- paged bitmaps ------------------------------------------------------------------------------ */

/*
 * Block state as paged bitmaps: one page holds the bits of 32768 blocks (4 KiB pages), and a page
 * all zeros is NULL, one all ones (wholly inside the bitmap) is UBITS_FULL: only mixed pages take
 * memory. So the state of a fully cached clean disk, and the bitmaps that are empty most of the
 * time (busy, pending, rewritten, snapshot), cost a pointer per 32768 blocks; no allocation is
 * ever larger than a page or the pointer array (kvmalloc refuses more than INT_MAX bytes); and
 * every index is a u64 (the bitmap_* helpers take unsigned int sizes on 6.1, so they are used only
 * inside one page). Changes happen under dev->lock; a change that has to turn a sentinel into a
 * mixed page allocates GFP_NOIO | __GFP_NOFAIL unless the caller reserved the page first.
 */
#define UBITS_PAGE_BITS ((u64)PAGE_SIZE * BITS_PER_BYTE)
#define UBITS_PAGE_WORDS (PAGE_SIZE / sizeof(long))
#define UBITS_FULL ((unsigned long *)1UL)

struct ubits {
	unsigned long **pages;
	u64 nbits;
	u64 nr_pages;
	u64 mixed;   /* pages allocated */
};

static int ubits_init(struct ubits *b, u64 nbits)
{
	b->nbits = nbits;
	b->nr_pages = DIV_ROUND_UP(nbits, UBITS_PAGE_BITS);
	b->mixed = 0;
	b->pages = kvcalloc(b->nr_pages, sizeof(*b->pages), GFP_KERNEL);
	return b->pages ? 0 : -ENOMEM;
}

static bool ubits_is_mixed(const unsigned long *pg)
{
	return pg && pg != UBITS_FULL;
}

static void ubits_put_page(struct ubits *b, u64 p, unsigned long *pg)
{
	if (ubits_is_mixed(b->pages[p])) {
		free_page((unsigned long)b->pages[p]);
		b->mixed--;
	}
	b->pages[p] = pg;
}

/* Empties the bitmap. May sleep (cond_resched): process context, dev->lock may be held. */
static void ubits_zero(struct ubits *b)
{
	u64 p;

	for (p = 0; b->mixed && p < b->nr_pages; p++) {
		ubits_put_page(b, p, NULL);
		if (!(p & 1023))
			cond_resched();
	}
	for (p = 0; p < b->nr_pages; p++)
		b->pages[p] = NULL;
}

static void ubits_destroy(struct ubits *b)
{
	if (!b->pages)
		return;
	ubits_zero(b);
	kvfree(b->pages);
	b->pages = NULL;
}

static u64 ubits_mem(const struct ubits *b)
{
	return b->mixed * PAGE_SIZE + b->nr_pages * sizeof(*b->pages);
}

/* The words of page p, read-only: a shared page of zeros or ones for the sentinels. */
static const unsigned long *ubits_ro(const struct ubits *b, u64 p)
{
	const unsigned long *pg = b->pages[p];

	return !pg ? uloop_zeros : pg == UBITS_FULL ? uloop_ones : pg;
}

/* Page p as a mixed page, allocated from its sentinel if need be; NULL if that fails. */
static unsigned long *ubits_mixed(struct ubits *b, u64 p, gfp_t gfp)
{
	unsigned long *pg = b->pages[p], *np;

	if (ubits_is_mixed(pg))
		return pg;
	np = (unsigned long *)__get_free_page(gfp);
	if (!np)
		return NULL;
	memset(np, pg ? 0xff : 0, PAGE_SIZE);
	b->pages[p] = np;
	b->mixed++;
	return np;
}

static bool ubits_test(const struct ubits *b, u64 i)
{
	return test_bit(i % UBITS_PAGE_BITS, ubits_ro(b, i / UBITS_PAGE_BITS));
}

/* Bits [s, e) of one page's words: calls fn(word index, mask) per word. */
#define for_each_word_mask(s, e, w, mask)						\
	for (unsigned long __s = (s), __e = (e), __take;				\
	     __s < __e && ((w) = __s / BITS_PER_LONG,					\
		__take = min_t(unsigned long, __e - __s, BITS_PER_LONG - __s % BITS_PER_LONG), \
		(mask) = (__take == BITS_PER_LONG ? ~0UL : ((1UL << __take) - 1)) << (__s % BITS_PER_LONG), 1); \
	     __s += __take)

/* First index in [start, end) whose bit is `value`, or end. */
static u64 ubits_find(const struct ubits *b, u64 start, u64 end, bool value)
{
	while (start < end) {
		u64 p = start / UBITS_PAGE_BITS, base = p * UBITS_PAGE_BITS;
		u64 pend = min(end, base + UBITS_PAGE_BITS);
		const unsigned long *pg = b->pages[p];
		unsigned long r;

		if (!ubits_is_mixed(pg)) {
			if ((pg == UBITS_FULL) == value)
				return start;
			start = pend;
			continue;
		}
		r = value ? find_next_bit(pg, pend - base, start - base) :
			    find_next_zero_bit(pg, pend - base, start - base);
		if (r < pend - base)
			return base + r;
		start = pend;
	}
	return end;
}

/* Bits set in [start, end) of a, and (with b) clear in b. */
static u64 ubits_count_andnot(const struct ubits *a, const struct ubits *b, u64 start, u64 end)
{
	u64 n = 0;

	while (start < end) {
		u64 p = start / UBITS_PAGE_BITS, base = p * UBITS_PAGE_BITS;
		u64 pend = min(end, base + UBITS_PAGE_BITS);
		const unsigned long *wa = ubits_ro(a, p), *wb = b ? ubits_ro(b, p) : uloop_zeros;
		unsigned long w, mask;

		if (a->pages[p] == NULL || (b && b->pages[p] == UBITS_FULL)) {
			start = pend;
			continue;
		}
		for_each_word_mask(start - base, pend - base, w, mask)
			n += hweight_long(wa[w] & ~wb[w] & mask);
		start = pend;
	}
	return n;
}

static u64 ubits_count(const struct ubits *b, u64 start, u64 end)
{
	return ubits_count_andnot(b, NULL, start, end);
}

static bool ubits_page_uniform(const unsigned long *pg, unsigned long v)
{
	size_t w;

	for (w = 0; w < UBITS_PAGE_WORDS; w++)
		if (pg[w] != v)
			return false;
	return true;
}

/* Materializes the pages of [start, end) that assigning `value` would have to allocate. */
static int ubits_reserve(struct ubits *b, u64 start, u64 end, bool value, gfp_t gfp)
{
	while (start < end) {
		u64 p = start / UBITS_PAGE_BITS, base = p * UBITS_PAGE_BITS;
		u64 pend = min(end, base + UBITS_PAGE_BITS);
		bool whole = start == base && pend == base + UBITS_PAGE_BITS;

		if (!whole && b->pages[p] == (value ? NULL : UBITS_FULL) && !ubits_mixed(b, p, gfp))
			return -ENOMEM;
		start = pend;
	}
	return 0;
}

/*
 * Sets (value) or clears [start, end); returns how many bits changed. Pages the range covers
 * whole become sentinels; others are materialized (GFP_NOIO | __GFP_NOFAIL unless reserved).
 */
static u64 ubits_assign(struct ubits *b, u64 start, u64 end, bool value)
{
	unsigned long *want = value ? UBITS_FULL : NULL;
	u64 changed = 0;
	bool maybe_empty;

	while (start < end) {
		u64 p = start / UBITS_PAGE_BITS, base = p * UBITS_PAGE_BITS;
		u64 pend = min(end, base + UBITS_PAGE_BITS);
		unsigned long *pg = b->pages[p], w, mask;

		if (pg == want) {
			start = pend;
			continue;
		}
		if (start == base && pend == base + UBITS_PAGE_BITS) {
			u64 ones = !pg ? 0 : pg == UBITS_FULL ? UBITS_PAGE_BITS :
				   bitmap_weight(pg, UBITS_PAGE_BITS);

			changed += value ? UBITS_PAGE_BITS - ones : ones;
			ubits_put_page(b, p, want);
			start = pend;
			continue;
		}
		pg = ubits_mixed(b, p, GFP_NOIO | __GFP_NOFAIL);
		maybe_empty = !value;
		for_each_word_mask(start - base, pend - base, w, mask) {
			unsigned long old = pg[w];

			pg[w] = value ? old | mask : old & ~mask;
			changed += hweight_long(old ^ pg[w]);
			maybe_empty &= !pg[w];
		}
		/* keep the sparse bitmaps (busy, pending, ...) sparse after use */
		if (maybe_empty && ubits_page_uniform(pg, 0))
			ubits_put_page(b, p, NULL);
		start = pend;
	}
	return changed;
}

static u64 ubits_set(struct ubits *b, u64 start, u64 end)
{
	return ubits_assign(b, start, end, true);
}

static u64 ubits_clear(struct ubits *b, u64 start, u64 end)
{
	return ubits_assign(b, start, end, false);
}

/* Installs a just-computed page (owned by the caller: it is taken or freed) as page p. */
static void ubits_install(struct ubits *b, u64 p, unsigned long *pg)
{
	bool whole = (p + 1) * UBITS_PAGE_BITS <= b->nbits;

	if (ubits_page_uniform(pg, 0)) {
		free_page((unsigned long)pg);
		ubits_put_page(b, p, NULL);
	} else if (whole && ubits_page_uniform(pg, ~0UL)) {
		free_page((unsigned long)pg);
		ubits_put_page(b, p, UBITS_FULL);
	} else {
		ubits_put_page(b, p, pg);
		b->mixed++;
	}
}

/* dst = src; dst must be empty. -ENOMEM leaves dst empty. */
static int ubits_copy(struct ubits *dst, const struct ubits *src, gfp_t gfp)
{
	u64 p;

	for (p = 0; p < src->nr_pages; p++) {
		unsigned long *pg = src->pages[p], *np;

		if (ubits_is_mixed(pg)) {
			np = (unsigned long *)__get_free_page(gfp);
			if (!np) {
				ubits_zero(dst);
				return -ENOMEM;
			}
			memcpy(np, pg, PAGE_SIZE);
			dst->mixed++;
			pg = np;
		}
		dst->pages[p] = pg;
		if (!(p & 255))
			cond_resched();
	}
	return 0;
}

/* dst |= src, and src is emptied; returns the bits newly set in dst. */
static u64 ubits_merge(struct ubits *dst, struct ubits *src)
{
	u64 p, changed = 0;

	for (p = 0; p < src->nr_pages; p++) {
		unsigned long *s = src->pages[p], *d = dst->pages[p];
		size_t w;

		if (!s)
			continue;
		if (!d) {
			changed += s == UBITS_FULL ? UBITS_PAGE_BITS : bitmap_weight(s, UBITS_PAGE_BITS);
			dst->pages[p] = s;
			if (s != UBITS_FULL) {
				dst->mixed++;
				src->mixed--;
			}
			src->pages[p] = NULL;
			continue;
		}
		if (d != UBITS_FULL) {
			const unsigned long *sw = ubits_ro(src, p);

			for (w = 0; w < UBITS_PAGE_WORDS; w++) {
				changed += hweight_long(sw[w] & ~d[w]);
				d[w] |= sw[w];
			}
		}
		ubits_put_page(src, p, NULL);
	}
	return changed;
}

/* Loads bits [0, nbits) of an empty bitmap from a user bitmap of ceil(nbits / 8) bytes. */
static int ubits_load(struct ubits *b, u64 uptr, gfp_t gfp)
{
	u64 bytes = DIV_ROUND_UP(b->nbits, 8), p;

	for (p = 0; p < b->nr_pages; p++) {
		u64 off = p * PAGE_SIZE, n = min_t(u64, PAGE_SIZE, bytes - off);
		u64 tail = b->nbits - p * UBITS_PAGE_BITS;
		unsigned long *pg = (unsigned long *)get_zeroed_page(gfp);

		if (!pg) {
			ubits_zero(b);
			return -ENOMEM;
		}
		if (copy_from_user(pg, u64_to_user_ptr(uptr + off), n)) {
			free_page((unsigned long)pg);
			ubits_zero(b);
			return -EFAULT;
		}
		if (tail < UBITS_PAGE_BITS)
			bitmap_clear(pg, tail, UBITS_PAGE_BITS - tail); /* bits past the end */
		ubits_install(b, p, pg); /* takes or frees it */
		cond_resched();
	}
	return 0;
}

/* Copies bits [0, nbits) to a user bitmap of ceil(nbits / 8) bytes. No lock: b must be stable. */
static int ubits_store(const struct ubits *b, u64 uptr)
{
	u64 bytes = DIV_ROUND_UP(b->nbits, 8), p;

	for (p = 0; p < b->nr_pages; p++) {
		u64 off = p * PAGE_SIZE, n = min_t(u64, PAGE_SIZE, bytes - off);
		void __user *dst = u64_to_user_ptr(uptr + off);

		if (!b->pages[p] ? clear_user(dst, n) : copy_to_user(dst, ubits_ro(b, p), n))
			return -EFAULT;
		cond_resched();
	}
	return 0;
}

/* ---- the device ---------------------------------------------------------------------------------- */

struct uloop_conn;

struct uloop_stats {
	atomic64_t read_hits, read_misses, write_hits, write_upcalls;
	atomic64_t read_bytes, write_bytes, zero_bytes;
	atomic64_t flushes, barriers, timeouts, io_errors, late_replies;
};

struct uloop_dev {
	struct kref kref;
	int index;
	struct file *cache;
	u64 size;
	u32 block_size, block_shift, flags;
	u32 lbs, pbs, unit_shift;
	u64 nr_blocks, nr_units;
	unsigned int io_timeout;    /* jiffies, 0: none */

	struct mutex lock;          /* everything below up to inflight_lock */
	struct ubits present, dirty;
	struct ubits busy;          /* a miss, intent, preserve, zero, claim, evict or first write owns it */
	struct ubits pending;       /* written whole while missing, for the next barrier */
	struct ubits bar_pending;   /* taken by the barrier in flight (bar_busy) */
	struct ubits lost;          /* taken by a barrier whose sync failed: dropped by CLEAR_ERROR */
	struct ubits rewritten;     /* written since EPOCH_BEGIN */
	struct ubits snap;          /* ULOOP_F_PRESERVE: dirty at EPOCH_BEGIN */
	struct ubits done;          /* ULOOP_F_PRESERVE: snapshot blocks preserved or released */
	u64 nr_present, nr_dirty, nr_zero, nr_pending, nr_lost, nr_claimed;
	u64 nr_bar_pending;         /* bits of bar_pending */
	u64 nr_owned;               /* blocks owned by writes in flight (cmd->owned, rule 4) */
	u64 nr_granted;             /* ROOM answers not yet used (the sum of cmd->room) */
	struct list_head preparing; /* uloop_cmd in uloop_prepare's passes (not nowait): EVICT
				     * leaves their blocks */
	u64 credit;                 /* CREDIT's limit on uloop_unasked(), ULOOP_CREDIT_NONE: none */
	u64 busy_seq;               /* bumped whenever busy bits clear: waiters re-check */
	wait_queue_head_t busy_wait;
	u64 epoch;
	bool epoch_open, epoch_failed;
	int error;                  /* sticky: a failed sync of the cache file */
	bool dead;                  /* REMOVE has begun */
	struct uloop_conn *daemon;  /* NULL while detached */
	unsigned long detached_at;  /* jiffies */
	struct list_head queued, sent;
	wait_queue_head_t msg_wait;
	u64 next_id;
	u64 expired[ULOOP_EXPIRED_IDS]; /* ids of timed-out INTENTs and BARRIERs the daemon read */
	unsigned int expired_next;
	struct list_head holds;     /* uloop_hold: timed-out upcalls still holding their blocks */
	bool bar_busy;              /* a FLUSH owns the barrier */
	wait_queue_head_t bar_wait;
	struct list_head claims;
	unsigned int nr_claims;
	u64 next_claim_id;

	spinlock_t inflight_lock;   /* inflight, nr_inflight; taken from completions */
	struct list_head inflight;  /* uloop_cmd between the last prepare pass and completion */
	unsigned int nr_inflight;
	wait_queue_head_t inflight_wait; /* EVICT waiting for requests on its blocks */

	unsigned long *accessed;    /* ULOOP_F_ACCESSED: one bit per unit, set_bit/fetch_andnot */
	struct mutex epoch_mutex;   /* EPOCH_BEGIN / COMMIT, one at a time (RELEASE: dev->lock only,
				     * it sets `done` bits after checking the epoch under it) */
	struct mutex bar_bits_mutex; /* BARRIER_BITS copying bar_pending out */
	bool deleting;              /* REMOVE decided: opens fail (under the disk's open_mutex) */
	bool scanning;              /* the ULOOP_F_PARTSCAN scan is queued or running */
	struct uloop_stats stats;

	struct blk_mq_tag_set tag_set;
	struct gendisk *disk;
	/*
	 * Two workqueues, both WQ_MEM_RECLAIM (we may be writeback's way out of reclaim): `wq` runs
	 * only what never waits for the daemon or for other requests (rq_work, done_work), so under
	 * memory pressure its rescuer always makes progress; `wait_wq` runs what may (a request's
	 * own work, a FUA's flush, the partition scan), and what those wait for runs on `wq`.
	 */
	struct workqueue_struct *wq, *wait_wq;
	spinlock_t rq_lock;         /* rq_list */
	struct list_head rq_list;   /* uloop_cmd from queue_rq, not yet taken by rq_work */
	struct work_struct rq_work; /* drains rq_list; empty once del_gendisk has returned */
	struct work_struct scan_work;
};

struct uloop_conn {
	struct mutex lock;     /* ADD / ATTACH on this fd */
	struct uloop_dev *dev; /* holds a reference while attached */
};

/* blk-mq's per-request pdu. */
struct uloop_cmd {
	struct list_head queue;    /* on dev->rq_list between queue_rq and rq_work */
	struct work_struct work;   /* requests that may wait (daemon, busy blocks), FLUSH, zeroing */
	struct work_struct done_work; /* after the cache-file I/O: owned blocks' state */
	struct work_struct fua_work; /* a FUA write's flush, after done_work if any */
	struct kiocb iocb;
	struct bio_vec *bvec;
	atomic_t ref;              /* the submitter and the I/O completion; the last ends it */
	long ret;
	struct list_head inflight; /* on dev->inflight while on_inflight */
	u64 first, last;           /* blocks touched, inclusive */
	bool write, owns_missing, on_inflight, upcalled, timed_out;
	bool ioctl;                /* not a request: BARRIER's context (killable waits, no timeout) */
	u64 room;                  /* missing blocks a ROOM answer let it take over the credit */
	struct list_head preparing; /* on dev->preparing during uloop_prepare (dev->lock) */
	u64 pfirst, plast;         /* the blocks it prepares, inclusive */
	/* owns_missing: the blocks first + i it took busy, covering them whole while missing */
	DECLARE_BITMAP(owned, ULOOP_MAX_RQ_BLOCKS);
	struct uloop_upcall *upcall; /* listed upcall serving this request (dev->lock) */
};

struct uloop_upcall {
	struct list_head node;
	struct uloop_msg msg;
	struct completion done;
	int error;
	bool listed, sent, answered;
	bool held;                 /* timed out after the daemon read it: a uloop_hold keeps its blocks busy */
	struct uloop_cmd *cmd;     /* the request waiting, for its timeout */
	struct uloop_hold *hold;   /* a re-issued ZERO: no request waits, its answer ends the hold */
};

/*
 * A MISS, ZERO or PRESERVE that timed out after the daemon read it: the daemon may still be
 * filling, punching or copying its blocks, so they stay busy until its late reply, its detach or
 * REMOVE. One per timed-out upcall, never bounded: letting a hold go early can lose a write.
 */
struct uloop_hold {
	struct list_head node;
	u64 id, first, end;        /* id 0: re-issued (up) */
	u32 type, flags;
	struct uloop_upcall *up;   /* a ZERO re-issued to the next daemon; NULL otherwise */
};

struct uloop_claim {
	struct list_head node;
	u64 id, first, count;
	unsigned long bits[];
};

static void uloop_free(struct kref *kref)
{
	struct uloop_dev *dev = container_of(kref, struct uloop_dev, kref);
	struct uloop_hold *h, *n;

	list_for_each_entry_safe(h, n, &dev->holds, node) { /* none after REMOVE */
		kfree(h->up);
		kfree(h);
	}
	ubits_destroy(&dev->present);
	ubits_destroy(&dev->dirty);
	ubits_destroy(&dev->busy);
	ubits_destroy(&dev->pending);
	ubits_destroy(&dev->bar_pending);
	ubits_destroy(&dev->lost);
	ubits_destroy(&dev->rewritten);
	ubits_destroy(&dev->snap);
	ubits_destroy(&dev->done);
	vfree(dev->accessed);
	kfree(dev);
}

static u64 uloop_block_bytes(struct uloop_dev *dev, u64 b, u64 e)
{
	return min_t(u64, e << dev->block_shift, dev->size) - (b << dev->block_shift);
}

/* ---- the daemon channel ------------------------------------------------------------------------ */

/*
 * Takes a listed upcall off its list and completes it. dev->lock held. The caller must not touch
 * `up` afterwards: its waiter may return at once without dev->lock (uloop_ask_room) and reuse the
 * stack it lived on.
 */
static void uloop_upcall_finish(struct uloop_upcall *up, int error)
{
	list_del(&up->node);
	up->listed = false;
	if (up->cmd)
		up->cmd->upcall = NULL;
	up->error = error;
	complete(&up->done);
}

static void uloop_zero_applied(struct uloop_dev *dev, u64 b, u64 e);

/* Ends a hold: its blocks are free again. dev->lock held; the caller wakes busy_wait. */
static void uloop_hold_release(struct uloop_dev *dev, struct uloop_hold *h)
{
	ubits_clear(&dev->busy, h->first, h->end);
	dev->busy_seq++;
	list_del(&h->node);
	kfree(h->up);
	kfree(h);
}

/* The late (or re-issued) answer of a hold: a ZERO that succeeded takes effect; then it ends. */
static void uloop_hold_answered(struct uloop_dev *dev, struct uloop_hold *h, int error)
{
	if (!error && h->type == ULOOP_MSG_ZERO)
		uloop_zero_applied(dev, h->first, h->end);
	uloop_hold_release(dev, h);
	wake_up_all(&dev->busy_wait);
}

/*
 * The daemon detached. A MISS or PRESERVE it never answered can no longer run: their holds end.
 * A ZERO's outcome is unknown (it may have recorded the zeros and punched): it stays held and is
 * sent again to the next daemon (a ZERO is idempotent), whose answer ends it. dev->lock held.
 */
static void uloop_holds_detach(struct uloop_dev *dev)
{
	struct uloop_hold *h, *n;

	list_for_each_entry_safe(h, n, &dev->holds, node) {
		struct uloop_upcall *up;

		if (h->type != ULOOP_MSG_ZERO) {
			uloop_hold_release(dev, h);
			continue;
		}
		if (h->up) /* already re-issued: it went back to the queue with the others */
			continue;
		up = kzalloc(sizeof(*up), GFP_NOIO | __GFP_NOFAIL);
		init_completion(&up->done);
		up->msg = (struct uloop_msg){ .type = ULOOP_MSG_ZERO, .flags = h->flags,
					      .offset = h->first << dev->block_shift,
					      .length = uloop_block_bytes(dev, h->first, h->end),
					      .id = ++dev->next_id };
		up->hold = h;
		up->listed = true;
		list_add_tail(&up->node, &dev->queued);
		h->up = up;
		h->id = 0;
	}
}

/* Every hold ends: the daemon that could still fill is gone (detach, REMOVE). dev->lock held. */
static void uloop_hold_release_all(struct uloop_dev *dev)
{
	struct uloop_hold *h, *n;

	list_for_each_entry_safe(h, n, &dev->holds, node)
		uloop_hold_release(dev, h);
}

/*
 * Its request timed out: remember the id if the daemon may still answer. An upcall that has the
 * daemon touch the blocks' cache content, read by the daemon, may still be running: a MISS
 * filling them, a ZERO punching them, a PRESERVE copying them aside. Their blocks stay busy until
 * the late reply (or the daemon's detach), or a write let in now could be overwritten by the fill
 * with the source's older data, punched away, or copied aside as the epoch's version: each gets
 * a uloop_hold, however many there are (a bound would have to let a running fill's blocks go).
 * Other ids go to a ring of the last ULOOP_EXPIRED_IDS, only to accept their late replies.
 * dev->lock held.
 */
static void uloop_upcall_expire(struct uloop_dev *dev, struct uloop_upcall *up)
{
	if (up->sent && (up->msg.type == ULOOP_MSG_MISS || up->msg.type == ULOOP_MSG_PRESERVE ||
			 up->msg.type == ULOOP_MSG_ZERO)) {
		/* small, and in process context (the timeout handler): worth not failing */
		struct uloop_hold *h = kzalloc(sizeof(*h), GFP_NOIO | __GFP_NOFAIL);

		h->id = up->msg.id;
		h->type = up->msg.type;
		h->flags = up->msg.flags;
		h->first = up->msg.offset >> dev->block_shift;
		h->end = ((up->msg.offset + up->msg.length - 1) >> dev->block_shift) + 1;
		list_add_tail(&h->node, &dev->holds);
		up->held = true;
	} else if (up->sent) {
		dev->expired[dev->expired_next] = up->msg.id;
		dev->expired_next = (dev->expired_next + 1) % ULOOP_EXPIRED_IDS;
	}
	uloop_upcall_finish(up, -ETIMEDOUT);
}

/*
 * Hands a message to the daemon and waits for its answer. The wait ends with the answer, with
 * -ETIMEDOUT when the request's io_timeout fires (uloop_timeout), with -EIO when no daemon has
 * been attached for reattach_timeout_s (a re-attached daemon gets the message again) or when the
 * device is removed. Process context only; never with dev->lock held.
 */
static int uloop_ask(struct uloop_dev *dev, struct uloop_cmd *cmd, struct uloop_upcall *up,
		     u32 type, u32 flags, u64 offset, u64 length, u64 epoch)
{
	init_completion(&up->done);
	up->msg = (struct uloop_msg){ .type = type, .flags = flags, .offset = offset,
				      .length = length, .epoch = epoch };
	up->cmd = cmd;
	up->sent = up->answered = false;
	mutex_lock(&dev->lock);
	if (dev->dead || READ_ONCE(cmd->timed_out)) {
		mutex_unlock(&dev->lock);
		return dev->dead ? -EIO : -ETIMEDOUT;
	}
	up->msg.id = ++dev->next_id;
	list_add_tail(&up->node, &dev->queued);
	up->listed = true;
	cmd->upcall = up;
	mutex_unlock(&dev->lock);
	wake_up_interruptible(&dev->msg_wait);

	while (!wait_for_completion_timeout(&up->done, HZ)) {
		if (cmd->ioctl && fatal_signal_pending(current)) {
			/* the daemon itself is dying: nobody will answer; a late reply is accepted */
			mutex_lock(&dev->lock);
			WRITE_ONCE(cmd->timed_out, true);
			if (up->listed)
				uloop_upcall_expire(dev, up);
			mutex_unlock(&dev->lock);
			wait_for_completion(&up->done);
			break;
		}
		mutex_lock(&dev->lock);
		if (up->listed && !dev->daemon &&
		    time_after(jiffies, dev->detached_at +
			       (unsigned long)min_t(unsigned int, reattach_timeout_s, INT_MAX / HZ) * HZ)) {
			uloop_upcall_finish(up, -EIO);
			pr_warn_ratelimited("uloop%d: no daemon for %us, failing a request\n",
					    dev->index, reattach_timeout_s);
		}
		mutex_unlock(&dev->lock);
	}
	return up->error;
}

/* Fails every outstanding upcall (device removal). dev->lock held. */
static void uloop_fail_all(struct uloop_dev *dev)
{
	struct uloop_upcall *up, *n;

	list_for_each_entry_safe(up, n, &dev->queued, node)
		uloop_upcall_finish(up, -EIO);
	list_for_each_entry_safe(up, n, &dev->sent, node)
		uloop_upcall_finish(up, -EIO);
}

/* Ends every claim: its blocks stay missing and are no longer busy. dev->lock held. */
static void uloop_drop_claims(struct uloop_dev *dev)
{
	struct uloop_claim *cl, *n;
	u64 i;

	list_for_each_entry_safe(cl, n, &dev->claims, node) {
		for_each_set_bit(i, cl->bits, cl->count)
			ubits_clear(&dev->busy, cl->first + i, cl->first + i + 1);
		dev->nr_claimed -= bitmap_weight(cl->bits, cl->count);
		list_del(&cl->node);
		kvfree(cl);
	}
	dev->nr_claims = 0;
	dev->busy_seq++;
}

/* ---- block state changes (dev->lock held), keeping the running counts exact --------------------- */

static void uloop_mark_present(struct uloop_dev *dev, u64 b, u64 e)
{
	dev->nr_zero -= ubits_count_andnot(&dev->dirty, &dev->present, b, e);
	dev->nr_present += ubits_set(&dev->present, b, e);
}

/*
 * A MISS answered: the blocks are present. Those that were zero (dirty, not present) become
 * pending too: the daemon may answer before it has synced their zeros and recorded them present
 * (the header allows it), and a write to them needs no INTENT (they are dirty), so only the next
 * FLUSH's barrier tells the store they are present, after its sync. Without it a partial write
 * and a FLUSH over such a block reported durable data the store still records as zeros.
 */
static void uloop_miss_done(struct uloop_dev *dev, u64 b, u64 e)
{
	u64 i;

	for (i = ubits_find(&dev->dirty, b, e, true); i < e; i = ubits_find(&dev->dirty, i + 1, e, true))
		if (!ubits_test(&dev->present, i))
			dev->nr_pending += ubits_set(&dev->pending, i, i + 1);
	uloop_mark_present(dev, b, e);
}

static void uloop_release_busy(struct uloop_dev *dev, u64 b, u64 e)
{
	ubits_clear(&dev->busy, b, e);
	dev->busy_seq++;
}

/*
 * A sync of the cache file failed (a FLUSH's, or CLEAR_ERROR's): the blocks written whole and
 * not yet handed over (pending) had their pages written back by that sync, or by background
 * writeback whose error it reported; they may be gone as much as a barrier's own set, and their
 * pages are clean again, so a later sync succeeds over them. Into `lost`, for CLEAR_ERROR to
 * drop. dev->lock held; the caller owns `lost` (the error is being set, or CLEAR_ERROR).
 */
static void uloop_pending_lost(struct uloop_dev *dev)
{
	dev->nr_lost += ubits_merge(&dev->lost, &dev->pending);
	dev->nr_pending = 0;
}

static void uloop_set_accessed(struct uloop_dev *dev, u64 first, u64 last)
{
	u64 u;

	if (!dev->accessed)
		return;
	for (u = first >> dev->unit_shift; u <= last >> dev->unit_shift; u++)
		if (!test_bit(u, dev->accessed))
			set_bit(u, dev->accessed);
}

static void uloop_inflight_add(struct uloop_dev *dev, struct uloop_cmd *cmd, u64 first, u64 last)
{
	unsigned long flags;

	cmd->first = first;
	cmd->last = last;
	spin_lock_irqsave(&dev->inflight_lock, flags);
	list_add_tail(&cmd->inflight, &dev->inflight);
	dev->nr_inflight++;
	cmd->on_inflight = true;
	spin_unlock_irqrestore(&dev->inflight_lock, flags);
}

static void uloop_inflight_del(struct uloop_dev *dev, struct uloop_cmd *cmd)
{
	unsigned long flags;

	if (!cmd->on_inflight)
		return;
	spin_lock_irqsave(&dev->inflight_lock, flags);
	list_del(&cmd->inflight);
	dev->nr_inflight--;
	cmd->on_inflight = false;
	spin_unlock_irqrestore(&dev->inflight_lock, flags);
	if (wq_has_sleeper(&dev->inflight_wait))
		wake_up_all(&dev->inflight_wait);
}

/* ---- the data path ------------------------------------------------------------------------------ */

/* Waits until busy bits change or the request times out; dev->lock not held. */
static int uloop_wait_busy(struct uloop_dev *dev, struct uloop_cmd *cmd, u64 seq)
{
	wait_event_idle(dev->busy_wait, READ_ONCE(dev->busy_seq) != seq || READ_ONCE(cmd->timed_out));
	return READ_ONCE(cmd->timed_out) ? -ETIMEDOUT : 0;
}

/* Waits for the barrier in flight to end; dev->lock not held. */
static int uloop_wait_barrier(struct uloop_dev *dev, struct uloop_cmd *cmd)
{
	if (cmd->ioctl)
		return wait_event_killable(dev->bar_wait, !READ_ONCE(dev->bar_busy)) ? -EINTR : 0;
	wait_event_idle(dev->bar_wait, !READ_ONCE(dev->bar_busy) || READ_ONCE(cmd->timed_out));
	return READ_ONCE(cmd->timed_out) ? -ETIMEDOUT : 0;
}

static const char *const uloop_msg_names[] = {
	[ULOOP_MSG_MISS] = "miss", [ULOOP_MSG_INTENT] = "intent", [ULOOP_MSG_BARRIER] = "barrier",
	[ULOOP_MSG_PRESERVE] = "preserve", [ULOOP_MSG_ZERO] = "zero", [ULOOP_MSG_ROOM] = "room",
};

/*
 * The blocks the kernel writes whole while missing without asking the daemon (rule 4) and that
 * no barrier has handed over yet, and those ROOM answers granted and no write has taken yet:
 * what CREDIT limits. dev->lock held.
 */
static u64 uloop_unasked(struct uloop_dev *dev)
{
	return dev->nr_pending + dev->nr_bar_pending + dev->nr_owned + dev->nr_lost + dev->nr_granted;
}

/*
 * The limit went away (ATTACH, CREDIT without a limit): every ROOM the daemon has not read yet
 * ends with no grant, and its write goes on (no limit now). A daemon then never reads a ROOM sent
 * under a limit it no longer has (an older daemon fails what it does not know: review8 K4). Not
 * when the limit is only raised: the protocol raises it by a ROOM's grant before answering that
 * ROOM, and the others, let go, would take that room too (the cache file passed the budget by
 * megabytes in the VM when a raise ended them). dev->lock held.
 */
static void uloop_rooms_end(struct uloop_dev *dev)
{
	struct uloop_upcall *up, *n;

	list_for_each_entry_safe(up, n, &dev->queued, node)
		if (up->msg.type == ULOOP_MSG_ROOM)
			uloop_upcall_finish(up, 0);
}

/*
 * ROOM (ULOOP_FEAT_CREDIT): the write cmd would take the n missing blocks of [b, e) whole past the
 * credit; asks the daemon to make room for n blocks (in the message's `epoch`; [b, e) is their
 * span). Its answer grants the request up to n missing blocks over the limit (cmd->room, counted in nr_granted by uloop_reply, under the
 * same lock as the reply: a CREDIT or QUERY right after the answer counts the grant), taken on
 * its next pass. The blocks are not made busy: the daemon does nothing to them, and the next
 * pass looks at them again.
 */
static int uloop_ask_room(struct uloop_dev *dev, struct uloop_cmd *cmd, u64 b, u64 e, u64 n)
{
	struct uloop_upcall up = {};
	u64 off = b << dev->block_shift, len = uloop_block_bytes(dev, b, e);
	int err;

	err = uloop_ask(dev, cmd, &up, ULOOP_MSG_ROOM, 0, off, len, n);
	/* on success uloop_reply set the grant (cmd->room) */
	if (err && err != -ETIMEDOUT)
		pr_warn_ratelimited("uloop%d: room at %llu+%llu failed: %d\n", dev->index, off, len, err);
	return err;
}

/*
 * Asks the daemon about blocks [b, e), which the caller marked busy, and applies the answer: MISS
 * sets present, INTENT dirty, PRESERVE marks the blocks preserved for `epoch`; then the blocks
 * are released. A PRESERVE the daemon answered with an error marks the epoch failed and counts as
 * done (the write goes on); every other failure fails the request.
 */
static int uloop_ask_blocks(struct uloop_dev *dev, struct uloop_cmd *cmd, u32 type, u64 b, u64 e,
			    u64 epoch)
{
	struct uloop_upcall up = {};
	u64 off = b << dev->block_shift, len = uloop_block_bytes(dev, b, e);
	int err;

	err = uloop_ask(dev, cmd, &up, type, 0, off, len, epoch);
	mutex_lock(&dev->lock);
	if (!err) {
		if (type == ULOOP_MSG_MISS)
			uloop_miss_done(dev, b, e);
		else if (type == ULOOP_MSG_INTENT)
			dev->nr_dirty += ubits_set(&dev->dirty, b, e);
		else if (type == ULOOP_MSG_PRESERVE && dev->epoch_open && dev->epoch == epoch)
			ubits_set(&dev->done, b, e);
	} else if (type == ULOOP_MSG_PRESERVE && up.answered) {
		if (dev->epoch_open && dev->epoch == epoch && !dev->epoch_failed) {
			dev->epoch_failed = true;
			pr_warn_ratelimited("uloop%d: the daemon failed to preserve blocks of epoch %llu (%d): that epoch cannot commit\n",
					    dev->index, epoch, err);
		}
		err = 0;
	}
	if (!up.held) /* else a uloop_hold keeps them until the late reply */
		uloop_release_busy(dev, b, e);
	mutex_unlock(&dev->lock);
	wake_up_all(&dev->busy_wait);
	if (err && err != -ETIMEDOUT)
		pr_warn_ratelimited("uloop%d: %s at %llu+%llu failed: %d\n", dev->index,
				    uloop_msg_names[type], off, len, err);
	return err;
}

/*
 * What one pass of uloop_prepare found to ask of the daemon for a write of [pos, pos + len):
 * a MISS for a missing block the write covers only in part (rule 5), an INTENT for a run of clean
 * blocks (rule 3), a PRESERVE for a run of blocks of the open epoch's snapshot not yet preserved
 * (ULOOP_F_PRESERVE). Returns the type, 0 for nothing, with [*b, *e) set. dev->lock held.
 */
static u32 uloop_write_needs(struct uloop_dev *dev, u64 pos, u64 len, u64 first, u64 last,
			     u64 *b, u64 *e)
{
	u64 end = pos + len, edges[2] = { first, last }, i;

	for (i = 0; i < 2; i++) {
		u64 bs = edges[i] << dev->block_shift;
		u64 be = min_t(u64, bs + dev->block_size, dev->size);

		if (!ubits_test(&dev->present, edges[i]) && (bs < pos || be > end)) {
			*b = edges[i];
			*e = *b + 1;
			return ULOOP_MSG_MISS;
		}
	}
	for (i = first; i <= last; i = *e) {
		*b = ubits_find(&dev->present, i, last + 1, true);
		if (*b > last)
			break;
		*e = ubits_find(&dev->present, *b, last + 1, false);
		*b = ubits_find(&dev->dirty, *b, *e, false);
		if (*b < *e) {
			*e = min(*e, ubits_find(&dev->dirty, *b, *e, true));
			return ULOOP_MSG_INTENT;
		}
	}
	if ((dev->flags & ULOOP_F_PRESERVE) && dev->epoch_open && !dev->epoch_failed) {
		for (i = first; i <= last; i = *e) {
			*b = ubits_find(&dev->snap, i, last + 1, true);
			if (*b > last)
				break;
			*e = ubits_find(&dev->snap, *b, last + 1, false);
			*b = ubits_find(&dev->done, *b, *e, false);
			if (*b < *e) {
				*e = min(*e, ubits_find(&dev->done, *b, *e, true));
				return ULOOP_MSG_PRESERVE;
			}
		}
	}
	return 0;
}

/*
 * Makes a read or write of [pos, pos + len) servable from the cache file: fills missing blocks via
 * the daemon (reads; partly written blocks, rule 5), persists dirty intents of clean blocks about to
 * be overwritten (rule 3), preserves blocks of the epoch's snapshot (ULOOP_F_PRESERVE), takes
 * missing blocks a write covers whole (rule 4) as busy for the write's lifetime, and registers the
 * request as in flight (for epochs and EVICT). Loops until one pass finds nothing to do; that last
 * pass, under dev->lock, is where the request commits to its blocks. With `nowait` (rq_work, which
 * must not block the requests behind it) only one pass runs: if it finds busy blocks or anything to
 * ask it returns -EAGAIN having changed nothing, and the request goes to its own work item.
 */
static int uloop_prepare_passes(struct uloop_dev *dev, struct uloop_cmd *cmd, u64 pos, u64 len,
				bool nowait)
{
	u64 first = pos >> dev->block_shift, last = (pos + len - 1) >> dev->block_shift;

	for (;;) {
		u64 b = 0, e = 0, seq, epoch = 0;
		u32 type = 0;
		int err;

		mutex_lock(&dev->lock);
		if (cmd->write && dev->error) {
			mutex_unlock(&dev->lock);
			return -EIO;
		}
		if (ubits_find(&dev->busy, first, last + 1, true) <= last) {
			seq = dev->busy_seq;
			mutex_unlock(&dev->lock);
			if (nowait)
				return -EAGAIN;
			err = uloop_wait_busy(dev, cmd, seq);
			if (err)
				return err;
			continue;
		}
		if (!cmd->write) {
			b = ubits_find(&dev->present, first, last + 1, false);
			if (b <= last) {
				e = ubits_find(&dev->present, b, last + 1, true);
				type = ULOOP_MSG_MISS;
			}
		} else {
			type = uloop_write_needs(dev, pos, len, first, last, &b, &e);
			epoch = dev->epoch;
		}
		if (type) {
			if (nowait) {
				mutex_unlock(&dev->lock);
				return -EAGAIN;
			}
			ubits_set(&dev->busy, b, e);
			cmd->upcalled = true;
			mutex_unlock(&dev->lock);
			err = uloop_ask_blocks(dev, cmd, type, b, e, epoch);
			if (err)
				return err;
			continue;
		}
		if (cmd->write && dev->credit != ULOOP_CREDIT_NONE) {
			/* the credit: missing blocks this write would take whole, unasked */
			u64 n = last + 1 - first - ubits_count(&dev->present, first, last + 1);

			/* its own unused grant is in nr_granted: not counted twice */
			if (n > cmd->room && uloop_unasked(dev) - cmd->room + n > dev->credit) {
				/* the count, and the span from its first missing block to its last */
				b = ubits_find(&dev->present, first, last + 1, false);
				for (e = last + 1; ubits_test(&dev->present, e - 1); e--)
					;
				mutex_unlock(&dev->lock);
				if (nowait)
					return -EAGAIN;
				cmd->upcalled = true;
				err = uloop_ask_room(dev, cmd, b, e, n);
				if (err)
					return err;
				continue;
			}
		}
		if (cmd->write) {
			gfp_t gfp = nowait ? GFP_NOWAIT | __GFP_NOWARN : GFP_NOIO;

			/* the nowait pass must not allocate in ubits_set: reserve, or go to the worker */
			if (nowait && ((dev->epoch_open &&
					ubits_reserve(&dev->rewritten, first, last + 1, true, gfp)) ||
				       (ubits_find(&dev->present, first, last + 1, false) <= last &&
					ubits_reserve(&dev->busy, first, last + 1, true, gfp)))) {
				mutex_unlock(&dev->lock);
				return -EAGAIN;
			}
			/* whatever is still missing is covered whole: ours until the write completes,
			 * recorded in the request (a block's busy bit may change hands meanwhile) */
			cmd->owns_missing = false;
			if (WARN_ON_ONCE(last - first >= ULOOP_MAX_RQ_BLOCKS)) {
				mutex_unlock(&dev->lock);
				return -EIO;
			}
			bitmap_zero(cmd->owned, ULOOP_MAX_RQ_BLOCKS);
			for (b = ubits_find(&dev->present, first, last + 1, false); b <= last;
			     b = ubits_find(&dev->present, e, last + 1, false)) {
				e = ubits_find(&dev->present, b, last + 1, true);
				ubits_set(&dev->busy, b, e);
				bitmap_set(cmd->owned, b - first, e - b);
				dev->nr_owned += e - b;
				cmd->owns_missing = true;
			}
			dev->nr_granted -= cmd->room; /* used, or not needed */
			cmd->room = 0;
			if (dev->epoch_open)
				ubits_set(&dev->rewritten, first, last + 1);
		}
		/*
		 * A read that missed is not a use (cache/clock.ts, GCLOCK's probation): a unit filled
		 * once and never hit again goes first, as on /dev/ublkbN and the NBD path. Writes mark
		 * their units as before.
		 */
		if (cmd->write || !cmd->upcalled)
			uloop_set_accessed(dev, first, last);
		uloop_inflight_add(dev, cmd, first, last);
		mutex_unlock(&dev->lock);
		return 0;
	}
}

/*
 * uloop_prepare_passes, and while they run (not nowait: those change nothing and never wait) the
 * request is on dev->preparing: EVICT leaves its blocks, so a block filled for it cannot be
 * evicted before its last pass by a fill it asks for next (with a budget smaller than the request
 * plus the dirty data, fill and eviction took turns for ever; the daemon flushes instead when
 * nothing else is evictable). A request that fails gives back its unused ROOM grant.
 */
static int uloop_prepare(struct uloop_dev *dev, struct uloop_cmd *cmd, u64 pos, u64 len,
			 bool nowait)
{
	int err;

	if (nowait)
		return uloop_prepare_passes(dev, cmd, pos, len, true);
	mutex_lock(&dev->lock);
	cmd->pfirst = pos >> dev->block_shift;
	cmd->plast = (pos + len - 1) >> dev->block_shift;
	list_add_tail(&cmd->preparing, &dev->preparing);
	mutex_unlock(&dev->lock);
	err = uloop_prepare_passes(dev, cmd, pos, len, false);
	mutex_lock(&dev->lock);
	list_del(&cmd->preparing);
	if (err) {
		dev->nr_granted -= cmd->room;
		cmd->room = 0;
	}
	mutex_unlock(&dev->lock);
	return err;
}

static int uloop_flush(struct uloop_dev *dev, struct uloop_cmd *cmd);

static blk_status_t uloop_status(struct uloop_dev *dev, struct request *rq, int err)
{
	if (err == -ETIMEDOUT) {
		atomic64_inc(&dev->stats.timeouts);
		pr_warn_ratelimited("uloop%d: a request at sector %llu waited more than %us for the daemon: EIO\n",
				    dev->index, (unsigned long long)blk_rq_pos(rq),
				    dev->io_timeout / HZ);
		return BLK_STS_IOERR;
	}
	return errno_to_blk_status(err);
}

/*
 * The blocks a write owned because it covered them whole while missing (rule 4): written, they
 * become present and dirty and pending for the next barrier; failed, they stay missing. Either
 * way they stop being busy. Process context.
 */
static void uloop_owned_done(struct uloop_dev *dev, struct uloop_cmd *cmd, int err)
{
	unsigned long i;

	mutex_lock(&dev->lock);
	/* exactly the blocks its last pass took: a busy, missing block of the range may belong to
	 * another request (a MISS after CLEAR_ERROR or a ZERO cleared its present bit) */
	for_each_set_bit(i, cmd->owned, ULOOP_MAX_RQ_BLOCKS) {
		u64 b = cmd->first + i;

		if (!err) {
			uloop_mark_present(dev, b, b + 1);
			dev->nr_dirty += ubits_set(&dev->dirty, b, b + 1);
			/* also with the sticky error set: a failed sync (CLEAR_ERROR's too) moves
			 * pending to lost, a successful one covers it */
			dev->nr_pending += ubits_set(&dev->pending, b, b + 1);
		}
		ubits_clear(&dev->busy, b, b + 1);
		dev->nr_owned--;
	}
	dev->busy_seq++;
	cmd->owns_missing = false;
	mutex_unlock(&dev->lock);
	wake_up_all(&dev->busy_wait);
}

/*
 * Ends a read or write whose cache-file I/O has completed: the in-flight list, the counters, then
 * a FUA write's flush in done_work. Any context.
 */
static void uloop_rw_end(struct uloop_dev *dev, struct uloop_cmd *cmd, int err)
{
	struct request *rq = blk_mq_rq_from_pdu(cmd);

	uloop_inflight_del(dev, cmd);
	if (!err) {
		if (cmd->write) {
			atomic64_inc(cmd->upcalled ? &dev->stats.write_upcalls : &dev->stats.write_hits);
			atomic64_add(blk_rq_bytes(rq), &dev->stats.write_bytes);
		} else {
			atomic64_inc(cmd->upcalled ? &dev->stats.read_misses : &dev->stats.read_hits);
			atomic64_add(blk_rq_bytes(rq), &dev->stats.read_bytes);
		}
	}
	if (!err && cmd->write && (rq->cmd_flags & REQ_FUA)) {
		queue_work(dev->wait_wq, &cmd->fua_work);
		return;
	}
	blk_mq_end_request(rq, uloop_status(dev, rq, err));
}

/* After the cache-file I/O, in process context: the owned blocks' state. Never waits. */
static void uloop_done_work(struct work_struct *work)
{
	struct uloop_cmd *cmd = container_of(work, struct uloop_cmd, done_work);
	struct request *rq = blk_mq_rq_from_pdu(cmd);
	struct uloop_dev *dev = rq->q->queuedata;
	unsigned int noio = memalloc_noio_save();

	uloop_owned_done(dev, cmd, cmd->ret);
	uloop_rw_end(dev, cmd, cmd->ret); /* may queue fua_work */
	memalloc_noio_restore(noio);
}

/* A FUA write's flush, on wait_wq: it may wait for a barrier and the daemon. */
static void uloop_fua_work(struct work_struct *work)
{
	struct uloop_cmd *cmd = container_of(work, struct uloop_cmd, fua_work);
	struct request *rq = blk_mq_rq_from_pdu(cmd);
	struct uloop_dev *dev = rq->q->queuedata;
	unsigned int noio = memalloc_noio_save();

	blk_mq_end_request(rq, uloop_status(dev, rq, uloop_flush(dev, cmd)));
	memalloc_noio_restore(noio);
}

/*
 * Ends the cache-file I/O of a request once both the submitter has returned from read_iter or
 * write_iter and the I/O has completed (as loop's lo_rw_aio: the iov_iter may point into the bio's
 * bvec array, which must outlive the submitter's use of it). Any context.
 */
static void uloop_rw_put(struct uloop_cmd *cmd)
{
	struct request *rq = blk_mq_rq_from_pdu(cmd);
	struct uloop_dev *dev = rq->q->queuedata;
	long ret;

	if (!atomic_dec_and_test(&cmd->ref))
		return;
	ret = cmd->ret;
	kfree(cmd->bvec);
	cmd->bvec = NULL;
	if (ret >= 0 && (unsigned long)ret < blk_rq_bytes(rq))
		ret = -EIO; /* the cache file shrank under us (ADD checked its size) */
	else if (ret > 0)
		ret = 0;
	cmd->ret = ret;
	if (ret) {
		atomic64_inc(&dev->stats.io_errors);
		pr_warn_ratelimited("uloop%d: cache file %s failed: %ld\n", dev->index,
				    cmd->write ? "write" : "read", ret);
	}
	if (cmd->owns_missing) {
		queue_work(dev->wq, &cmd->done_work);
		return;
	}
	uloop_rw_end(dev, cmd, ret);
}

/* Completion of the cache-file I/O; any context (direct I/O completes in interrupts). */
static void uloop_rw_done(struct kiocb *iocb, long ret)
{
	struct uloop_cmd *cmd = container_of(iocb, struct uloop_cmd, iocb);

	cmd->ret = ret;
	uloop_rw_put(cmd);
}

/* The cache-file I/O of one request: a kiocb over a bvec iov_iter, as loop's lo_rw_aio. */
static void uloop_rw(struct uloop_dev *dev, struct uloop_cmd *cmd, struct request *rq, u64 pos)
{
	struct file *file = dev->cache;
	struct req_iterator it;
	struct bio_vec bv, *bvec;
	struct iov_iter iter;
	unsigned int nr = 0, offset = 0;
	ssize_t ret;

	atomic_set(&cmd->ref, 2);
	cmd->bvec = NULL;
	rq_for_each_bvec(bv, rq, it)
		nr++;
	if (rq->bio != rq->biotail) {
		bvec = kmalloc_array(nr, sizeof(*bvec), GFP_NOIO);
		if (!bvec) {
			cmd->ret = -ENOMEM;
			atomic_set(&cmd->ref, 1);
			uloop_rw_put(cmd);
			return;
		}
		cmd->bvec = bvec;
		nr = 0;
		rq_for_each_bvec(bv, rq, it)
			bvec[nr++] = bv;
	} else {
		/* one bio: its own bvec array, from where the bio's iterator stands (the offset into
		 * the current bvec, which 7.3 renamed from bi_bvec_done to bi_offset: computed with
		 * mp_bvec_iter_offset(), which every release has) */
		bvec = (struct bio_vec *)__bvec_iter_bvec(rq->bio->bi_io_vec, rq->bio->bi_iter);
		offset = mp_bvec_iter_offset(rq->bio->bi_io_vec, rq->bio->bi_iter) - bvec->bv_offset;
	}
	iov_iter_bvec(&iter, cmd->write ? WRITE : READ, bvec, nr, blk_rq_bytes(rq));
	iter.iov_offset = offset;

	cmd->iocb.ki_pos = pos;
	cmd->iocb.ki_filp = file;
	cmd->iocb.ki_complete = uloop_rw_done;
	cmd->iocb.ki_flags = (file->f_flags & O_DIRECT) ? IOCB_DIRECT : 0;
	cmd->iocb.ki_ioprio = req_get_ioprio(rq);
	if (cmd->write) {
		file_start_write(file);
		ret = file->f_op->write_iter(&cmd->iocb, &iter);
		file_end_write(file);
	} else {
		ret = file->f_op->read_iter(&cmd->iocb, &iter);
	}
	if (ret != -EIOCBQUEUED)
		uloop_rw_done(&cmd->iocb, ret);
	uloop_rw_put(cmd);
}

/*
 * FLUSH (rule 6). One barrier at a time, in arrival order. Under dev->lock the pending set (blocks
 * written whole while missing, whose writes have completed) is taken first, then the cache file is
 * synced: every write taken is covered by that sync, and a write completing during it stays
 * pending for the next FLUSH (take-then-sync: the other order would hand over a write that
 * completed after the sync had passed it, as present, before its data is durable: invariant 1).
 * Then, if anything was taken, a BARRIER upcall: the daemon fetches the set (BARRIER_BITS) and
 * persists it; the FLUSH completes after its answer. The set moves by swapping two preallocated
 * paged bitmaps: nothing is allocated per FLUSH (bar_pending is empty again afterwards).
 * A failed sync sets the sticky error (see CLEAR_ERROR in the uapi header) and keeps the set
 * aside in `lost`, with what became pending since the take (its pages were in that sync too);
 * a failed barrier puts the set back for the next FLUSH.
 */
static int uloop_barrier_run(struct uloop_dev *dev, struct uloop_cmd *cmd, u64 *handed)
{
	struct uloop_upcall up = {};
	u64 taken = 0;
	int err;

	for (;;) {
		mutex_lock(&dev->lock);
		if (!dev->bar_busy)
			break;
		mutex_unlock(&dev->lock);
		err = uloop_wait_barrier(dev, cmd);
		if (err)
			return err;
	}
	dev->bar_busy = true;
	if (dev->error) {
		err = -EIO;
		goto out_locked;
	}
	swap(dev->pending, dev->bar_pending);
	taken = dev->nr_pending;
	dev->nr_pending = 0;
	dev->nr_bar_pending = taken;
	mutex_unlock(&dev->lock);

	/* datasync: the data and what is needed to read it back (allocation, size), as the
	 * store's commit does (fdatasync); timestamps are not worth a journal commit per FLUSH */
	err = vfs_fsync(dev->cache, 1);
	if (err) {
		atomic64_inc(&dev->stats.io_errors);
		pr_err("uloop%d: sync of the cache file failed (%d): writes and FLUSH fail with EIO until the daemon clears the error\n",
		       dev->index, err);
		mutex_lock(&dev->lock);
		dev->error = -EIO;
		swap(dev->lost, dev->bar_pending); /* lost was empty: the error was not set */
		dev->nr_lost = taken;
		dev->nr_bar_pending = 0;
		uloop_pending_lost(dev);
		err = -EIO;
		goto out_locked;
	}
	if (taken)
		err = uloop_ask(dev, cmd, &up, ULOOP_MSG_BARRIER, 0, 0,
				DIV_ROUND_UP(dev->nr_blocks, 8), 0);
	mutex_lock(&dev->bar_bits_mutex); /* no BARRIER_BITS is reading bar_pending */
	mutex_lock(&dev->lock);
	dev->nr_bar_pending = 0;
	if (err) {
		dev->nr_pending += ubits_merge(&dev->pending, &dev->bar_pending);
		if (err != -ETIMEDOUT)
			pr_warn_ratelimited("uloop%d: barrier failed: %d\n", dev->index, err);
	} else {
		ubits_zero(&dev->bar_pending);
		if (taken)
			atomic64_inc(&dev->stats.barriers);
	}
	mutex_unlock(&dev->bar_bits_mutex);
out_locked:
	dev->bar_busy = false;
	mutex_unlock(&dev->lock);
	wake_up_all(&dev->bar_wait);
	if (!err && handed)
		*handed = taken;
	return err;
}

/* A FLUSH request (or a FUA write's): the barrier, counted in `flushes`. */
static int uloop_flush(struct uloop_dev *dev, struct uloop_cmd *cmd)
{
	int err = uloop_barrier_run(dev, cmd, NULL);

	if (!err)
		atomic64_inc(&dev->stats.flushes);
	return err;
}

/* Writes zeros over [pos, pos + len) of the cache file, synchronously. */
static int uloop_write_zeros(struct uloop_dev *dev, u64 pos, u64 len)
{
	while (len) {
		size_t n = min_t(u64, len, PAGE_SIZE);
		loff_t p = pos;
		ssize_t r = kernel_write(dev->cache, uloop_zeros, n, &p);

		if (r != n)
			return r < 0 ? r : -EIO;
		pos += n;
		len -= n;
	}
	return 0;
}

/*
 * The daemon answered a ZERO of [b, e) with success (on time, late, or re-issued): it recorded
 * the blocks as zeros and punched them. They are dirty and not present, and no longer pending
 * (the daemon's record supersedes) nor lost (a CLEAR_ERROR drop would make them clean). An open
 * epoch sees them rewritten. dev->lock held; the blocks are busy (the caller's).
 */
static void uloop_zero_applied(struct uloop_dev *dev, u64 b, u64 e)
{
	u64 zero_before = ubits_count_andnot(&dev->dirty, &dev->present, b, e);

	dev->nr_present -= ubits_clear(&dev->present, b, e);
	dev->nr_dirty += ubits_set(&dev->dirty, b, e);
	dev->nr_pending -= ubits_clear(&dev->pending, b, e);
	dev->nr_lost -= ubits_clear(&dev->lost, b, e);
	dev->nr_zero += (e - b) - zero_before;
	if (dev->epoch_open)
		ubits_set(&dev->rewritten, b, e);
}

/*
 * The whole blocks [b, e) of a DISCARD or WRITE_ZEROES: a ZERO upcall; afterwards the blocks are
 * dirty and not present (and no longer pending: the daemon recorded them as zeros). Blocks that
 * the barrier in flight is handing over wait for it to end, so that the daemon never records a
 * block zero and then present from an older barrier.
 */
static int uloop_zero_blocks(struct uloop_dev *dev, struct uloop_cmd *cmd, u64 b, u64 e, u32 flags)
{
	struct uloop_upcall up = {};
	int err;

	for (;;) {
		u64 pb = 0, pe = 0, seq, epoch;
		u32 type = 0;

		mutex_lock(&dev->lock);
		if (dev->error) {
			mutex_unlock(&dev->lock);
			return -EIO;
		}
		if (ubits_find(&dev->busy, b, e, true) < e) {
			seq = dev->busy_seq;
			mutex_unlock(&dev->lock);
			err = uloop_wait_busy(dev, cmd, seq);
			if (err)
				return err;
			continue;
		}
		if (dev->bar_busy && ubits_find(&dev->bar_pending, b, e, true) < e) {
			mutex_unlock(&dev->lock);
			err = uloop_wait_barrier(dev, cmd);
			if (err)
				return err;
			continue;
		}
		/* only PRESERVE can be needed: whole blocks need no fill, and no intent (the
		 * ZERO upcall records them dirty itself) */
		if ((dev->flags & ULOOP_F_PRESERVE) && dev->epoch_open && !dev->epoch_failed) {
			pb = ubits_find(&dev->snap, b, e, true);
			while (pb < e) {
				pe = ubits_find(&dev->snap, pb, e, false);
				pb = ubits_find(&dev->done, pb, pe, false);
				if (pb < pe) {
					pe = min(pe, ubits_find(&dev->done, pb, pe, true));
					type = ULOOP_MSG_PRESERVE;
					break;
				}
				pb = ubits_find(&dev->snap, pe, e, true);
			}
		}
		epoch = dev->epoch;
		if (type) {
			ubits_set(&dev->busy, pb, pe);
			mutex_unlock(&dev->lock);
			err = uloop_ask_blocks(dev, cmd, type, pb, pe, epoch);
			if (err)
				return err;
			continue;
		}
		ubits_set(&dev->busy, b, e);
		if (dev->epoch_open)
			ubits_set(&dev->rewritten, b, e);
		uloop_inflight_add(dev, cmd, b, e - 1);
		mutex_unlock(&dev->lock);
		break;
	}
	err = uloop_ask(dev, cmd, &up, ULOOP_MSG_ZERO, flags, b << dev->block_shift,
			uloop_block_bytes(dev, b, e), 0);
	mutex_lock(&dev->lock);
	if (!err)
		uloop_zero_applied(dev, b, e);
	if (!up.held) /* else a uloop_hold keeps them until the late reply */
		uloop_release_busy(dev, b, e);
	mutex_unlock(&dev->lock);
	uloop_inflight_del(dev, cmd);
	wake_up_all(&dev->busy_wait);
	if (err && err != -ETIMEDOUT)
		pr_warn_ratelimited("uloop%d: zero at %llu+%llu failed: %d\n", dev->index,
				    b << dev->block_shift, uloop_block_bytes(dev, b, e), err);
	return err;
}

/*
 * The part of a DISCARD or WRITE_ZEROES not covering whole blocks (within one block, or straddling
 * two, e.g. [0.5, 1.5) blocks): written with zeros like any write.
 */
static int uloop_zero_part(struct uloop_dev *dev, struct uloop_cmd *cmd, u64 pos, u64 len)
{
	int err;

	cmd->owns_missing = false;
	err = uloop_prepare(dev, cmd, pos, len, false);
	if (err)
		return err;
	err = uloop_write_zeros(dev, pos, len);
	if (cmd->owns_missing) /* the device's short last block, covered whole */
		uloop_owned_done(dev, cmd, err);
	uloop_inflight_del(dev, cmd);
	if (err) {
		atomic64_inc(&dev->stats.io_errors);
		pr_warn_ratelimited("uloop%d: writing zeros to the cache file failed: %d\n",
				    dev->index, err);
	}
	return err;
}

/* DISCARD and WRITE_ZEROES (ULOOP_F_ZERO): the range reads as zeros afterwards. */
static int uloop_zero(struct uloop_dev *dev, struct uloop_cmd *cmd, struct request *rq)
{
	u64 pos = (u64)blk_rq_pos(rq) << SECTOR_SHIFT, end = pos + blk_rq_bytes(rq);
	u64 b = DIV_ROUND_UP(pos, dev->block_size), e = end >> dev->block_shift;
	u32 flags = req_op(rq) == REQ_OP_DISCARD ? ULOOP_MSG_F_DISCARD :
		    (rq->cmd_flags & REQ_NOUNMAP) ? ULOOP_MSG_F_NOUNMAP : 0;
	int err = 0;

	cmd->write = true;
	if (end == dev->size)
		e = dev->nr_blocks; /* the device's last block, however short, is whole here */
	if (b >= e) /* within one block */
		return uloop_zero_part(dev, cmd, pos, end - pos);
	if (pos < b << dev->block_shift)
		err = uloop_zero_part(dev, cmd, pos, (b << dev->block_shift) - pos);
	if (!err)
		err = uloop_zero_blocks(dev, cmd, b, e, flags);
	if (!err && end > e << dev->block_shift && e < dev->nr_blocks)
		err = uloop_zero_part(dev, cmd, e << dev->block_shift, end - (e << dev->block_shift));
	if (!err)
		atomic64_add(end - pos, &dev->stats.zero_bytes);
	return err;
}

/* A request that may sleep on the daemon, on busy blocks or on a barrier: its own work item. */
static void uloop_work(struct work_struct *work)
{
	struct uloop_cmd *cmd = container_of(work, struct uloop_cmd, work);
	struct request *rq = blk_mq_rq_from_pdu(cmd);
	struct uloop_dev *dev = rq->q->queuedata;
	u64 pos = (u64)blk_rq_pos(rq) << SECTOR_SHIFT;
	unsigned int noio = memalloc_noio_save();
	int err;

	switch (req_op(rq)) {
	case REQ_OP_FLUSH:
		blk_mq_end_request(rq, uloop_status(dev, rq, uloop_flush(dev, cmd)));
		break;
	case REQ_OP_READ:
	case REQ_OP_WRITE:
		cmd->write = req_op(rq) == REQ_OP_WRITE;
		if (cmd->write && !(dev->flags & ULOOP_F_WRITEBACK)) {
			blk_mq_end_request(rq, BLK_STS_IOERR);
			break;
		}
		err = uloop_prepare(dev, cmd, pos, blk_rq_bytes(rq), false);
		if (err) {
			blk_mq_end_request(rq, uloop_status(dev, rq, err));
			break;
		}
		uloop_rw(dev, cmd, rq, pos);
		break;
	case REQ_OP_DISCARD:
	case REQ_OP_WRITE_ZEROES:
		if (!(dev->flags & ULOOP_F_ZERO)) {
			blk_mq_end_request(rq, BLK_STS_NOTSUPP);
			break;
		}
		blk_mq_end_request(rq, uloop_status(dev, rq, uloop_zero(dev, cmd, rq)));
		break;
	default:
		blk_mq_end_request(rq, BLK_STS_NOTSUPP);
	}
	memalloc_noio_restore(noio);
}

/*
 * The hit path: a read or write whose blocks are present, not busy and (writes) dirty or missing
 * and covered whole, and need no PRESERVE, needs no daemon; its cache-file I/O is issued here, in
 * rq_work. Anything else gets its own work item, so that a request waiting for the daemon never
 * holds up the others.
 */
static void uloop_dispatch(struct uloop_dev *dev, struct uloop_cmd *cmd)
{
	struct request *rq = blk_mq_rq_from_pdu(cmd);
	u64 pos = (u64)blk_rq_pos(rq) << SECTOR_SHIFT;
	int err;

	if (req_op(rq) == REQ_OP_READ ||
	    (req_op(rq) == REQ_OP_WRITE && (dev->flags & ULOOP_F_WRITEBACK))) {
		cmd->write = req_op(rq) == REQ_OP_WRITE;
		err = uloop_prepare(dev, cmd, pos, blk_rq_bytes(rq), true);
		if (!err) {
			uloop_rw(dev, cmd, rq, pos);
			return;
		}
		if (err != -EAGAIN) {
			blk_mq_end_request(rq, uloop_status(dev, rq, err));
			return;
		}
	}
	queue_work(dev->wait_wq, &cmd->work);
}

/* Drains dev->rq_list (one work item per device, as loop's per-device worker). */
static void uloop_rq_work(struct work_struct *work)
{
	struct uloop_dev *dev = container_of(work, struct uloop_dev, rq_work);
	unsigned int noio = memalloc_noio_save();
	LIST_HEAD(list);

	for (;;) {
		spin_lock_irq(&dev->rq_lock);
		list_splice_tail_init(&dev->rq_list, &list);
		spin_unlock_irq(&dev->rq_lock);
		if (list_empty(&list))
			break;
		while (!list_empty(&list)) {
			struct uloop_cmd *cmd = list_first_entry(&list, struct uloop_cmd, queue);

			list_del_init(&cmd->queue);
			uloop_dispatch(dev, cmd);
		}
	}
	memalloc_noio_restore(noio);
}

/* Never sleeps: the request goes to process context, where the file I/O and any wait runs. */
static blk_status_t uloop_queue_rq(struct blk_mq_hw_ctx *hctx, const struct blk_mq_queue_data *bd)
{
	struct request *rq = bd->rq;
	struct uloop_cmd *cmd = blk_mq_rq_to_pdu(rq);
	struct uloop_dev *dev = rq->q->queuedata;
	unsigned long flags;

	cmd->owns_missing = cmd->on_inflight = cmd->upcalled = cmd->timed_out = false;
	cmd->room = 0;
	cmd->upcall = NULL;
	cmd->ret = 0;
	INIT_WORK(&cmd->work, uloop_work);
	INIT_WORK(&cmd->done_work, uloop_done_work);
	INIT_WORK(&cmd->fua_work, uloop_fua_work);
	blk_mq_start_request(rq);
	spin_lock_irqsave(&dev->rq_lock, flags);
	list_add_tail(&cmd->queue, &dev->rq_list);
	spin_unlock_irqrestore(&dev->rq_lock, flags);
	queue_work(dev->wq, &dev->rq_work); /* a no-op while it is pending */
	return BLK_STS_OK;
}

/*
 * A request outstanding for io_timeout: mark it; wherever it waits for the daemon it gives up
 * with -ETIMEDOUT and the worker ends it with EIO (counted in `timeouts`). A request in cache-file
 * I/O only completes normally. The worker always ends the request itself: the timer is reset.
 */
static enum blk_eh_timer_return uloop_timeout(struct request *rq)
{
	struct uloop_cmd *cmd = blk_mq_rq_to_pdu(rq);
	struct uloop_dev *dev = rq->q->queuedata;

	if (!dev->io_timeout || READ_ONCE(cmd->timed_out))
		return BLK_EH_RESET_TIMER;
	WRITE_ONCE(cmd->timed_out, true);
	mutex_lock(&dev->lock);
	if (cmd->upcall && cmd->upcall->listed)
		uloop_upcall_expire(dev, cmd->upcall);
	mutex_unlock(&dev->lock);
	wake_up_all(&dev->busy_wait);
	wake_up_all(&dev->bar_wait);
	return BLK_EH_RESET_TIMER;
}

static const struct blk_mq_ops uloop_mq_ops = {
	.queue_rq = uloop_queue_rq,
	.timeout = uloop_timeout,
};

/* Refuses opens once REMOVE has decided (loop's Lo_deleting); the caller holds open_mutex. */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 5, 0) /* 6.5: ->open takes the gendisk and blk_mode_t */
static int uloop_open(struct gendisk *disk, blk_mode_t mode)
#else
static int uloop_open(struct block_device *bdev, fmode_t mode)
#endif
{
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 5, 0)
	struct gendisk *disk = bdev->bd_disk;
#endif
	struct uloop_dev *dev = disk->private_data;

	return READ_ONCE(dev->deleting) ? -ENXIO : 0;
}

static const struct block_device_operations uloop_fops = {
	.owner = THIS_MODULE,
	.open = uloop_open,
};

/* ULOOP_F_PARTSCAN: reads the partition table once the daemon can answer the misses it causes. */
static void uloop_scan_work(struct work_struct *work)
{
	struct uloop_dev *dev = container_of(work, struct uloop_dev, scan_work);
	int err;

	mutex_lock(&dev->disk->open_mutex);
	err = bdev_disk_changed(dev->disk, false);
	mutex_unlock(&dev->disk->open_mutex);
	if (err)
		pr_warn("uloop%d: reading the partition table failed: %d\n", dev->index, err);
	WRITE_ONCE(dev->scanning, false);
}

/* ---- ADD / REMOVE ------------------------------------------------------------------------------- */

/* A refused ioctl: one line in the log (ratelimited) saying why, and its errno. */
#define uloop_refuse(err, fmt, ...)							\
	({										\
		pr_warn_ratelimited("uloop: " fmt " (%pe)\n", ##__VA_ARGS__, ERR_PTR(err)); \
		(err);									\
	})

static int uloop_max_devices(void)
{
	return 1 << (MINORBITS - part_shift);
}

/* Blocks of `size` bytes: DIV_ROUND_UP would overflow for sizes near 2^64. */
static u64 uloop_nr_blocks(u64 size, u32 block_size)
{
	return size / block_size + !!(size % block_size);
}

static bool uloop_valid_lbs(u32 lbs)
{
	return lbs == 512 || lbs == 1024 || lbs == 2048 || lbs == 4096;
}

static int uloop_alloc_state(struct uloop_dev *dev)
{
	struct ubits *all[] = { &dev->present, &dev->dirty, &dev->busy, &dev->pending,
				&dev->bar_pending, &dev->lost, &dev->rewritten, &dev->snap, &dev->done };
	size_t i;

	for (i = 0; i < ARRAY_SIZE(all); i++)
		if (ubits_init(all[i], dev->nr_blocks))
			return -ENOMEM;
	if (dev->flags & ULOOP_F_ACCESSED) {
		dev->accessed = vzalloc(BITS_TO_LONGS(dev->nr_units) * sizeof(long));
		if (!dev->accessed)
			return -ENOMEM;
	}
	return 0;
}

static u64 uloop_mem(struct uloop_dev *dev)
{
	struct ubits *all[] = { &dev->present, &dev->dirty, &dev->busy, &dev->pending,
				&dev->bar_pending, &dev->lost, &dev->rewritten, &dev->snap, &dev->done };
	u64 n = sizeof(*dev);
	size_t i;

	for (i = 0; i < ARRAY_SIZE(all); i++)
		n += ubits_mem(all[i]);
	if (dev->accessed)
		n += BITS_TO_LONGS(dev->nr_units) * sizeof(long);
	return n;
}

/* Sets up the queue limits and allocates the disk. */
static struct gendisk *uloop_alloc_disk(struct uloop_dev *dev)
{
	struct gendisk *disk;
	bool zero = dev->flags & ULOOP_F_ZERO;

#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 9, 0)
	/* 6.9: blk_mq_alloc_disk() takes the queue_limits */
	struct queue_limits lim = {
		.logical_block_size = dev->lbs,
		.physical_block_size = dev->pbs,
		.io_min = dev->block_size,
		.max_hw_sectors = ULOOP_MAX_RQ_SECTORS,
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 11, 0)
		/* 6.11: the volatile cache and FUA became queue_limits.features */
		.features = BLK_FEAT_WRITE_CACHE | BLK_FEAT_FUA,
#endif
	};

	if (zero) {
		lim.max_hw_discard_sectors = ULOOP_MAX_ZERO_SECTORS;
		lim.max_write_zeroes_sectors = ULOOP_MAX_ZERO_SECTORS;
		lim.discard_granularity = dev->block_size;
	}
	disk = blk_mq_alloc_disk(&dev->tag_set, &lim, dev);
	if (IS_ERR(disk))
		return disk;
#else
	disk = blk_mq_alloc_disk(&dev->tag_set, dev);
	if (IS_ERR(disk))
		return disk;
	blk_queue_logical_block_size(disk->queue, dev->lbs);
	blk_queue_physical_block_size(disk->queue, dev->pbs);
	blk_queue_io_min(disk->queue, dev->block_size);
	blk_queue_max_hw_sectors(disk->queue, ULOOP_MAX_RQ_SECTORS);
	if (zero) {
		blk_queue_max_discard_sectors(disk->queue, ULOOP_MAX_ZERO_SECTORS);
		blk_queue_max_write_zeroes_sectors(disk->queue, ULOOP_MAX_ZERO_SECTORS);
		disk->queue->limits.discard_granularity = dev->block_size;
	}
#endif
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 11, 0)
	blk_queue_write_cache(disk->queue, true, true);
#endif
	return disk;
}

/* Checks an ADD's arguments; returns 0 or the errno of the first problem, logged. */
static int uloop_add_check(struct uloop_add *a)
{
	u64 nr_blocks;

	if (a->version != ULOOP_ABI_VERSION)
		return uloop_refuse(-EPROTO, "ADD refused: the daemon speaks ABI %u, this module %u: rebuild or reload one of them",
				    a->version, ULOOP_ABI_VERSION);
	if ((a->flags & ~ULOOP_F_ALL) || a->__reserved[0] || a->__reserved[1] || a->__reserved[2])
		return uloop_refuse(-EOPNOTSUPP, "ADD refused: unknown flags %#x or reserved fields set",
				    a->flags & ~ULOOP_F_ALL);
	if ((a->flags & (ULOOP_F_PRESERVE | ULOOP_F_ZERO)) && !(a->flags & ULOOP_F_WRITEBACK))
		return uloop_refuse(-EOPNOTSUPP, "ADD refused: PRESERVE and ZERO need WRITEBACK");
	if (!is_power_of_2(a->block_size) || a->block_size < 4096 || a->block_size > (1U << 20))
		return uloop_refuse(-EDOM, "ADD refused: block size %u is not a power of two from 4096 to 1048576",
				    a->block_size);
	if (!a->logical_block_size)
		a->logical_block_size = SECTOR_SIZE;
	if (!uloop_valid_lbs(a->logical_block_size))
		return uloop_refuse(-ERANGE, "ADD refused: logical block size %u is not 512, 1024, 2048 or 4096",
				    a->logical_block_size);
	if (!a->physical_block_size)
		a->physical_block_size = max_t(u32, a->logical_block_size,
					       min_t(u32, a->block_size, 4096));
	if (!is_power_of_2(a->physical_block_size) ||
	    a->physical_block_size < a->logical_block_size || a->physical_block_size > a->block_size)
		return uloop_refuse(-ERANGE, "ADD refused: physical block size %u is not a power of two from %u to %u",
				    a->physical_block_size, a->logical_block_size, a->block_size);
	if (!a->size || a->size % a->logical_block_size)
		return uloop_refuse(-EINVAL, "ADD refused: size %llu is not a positive multiple of %u",
				    a->size, a->logical_block_size);
	nr_blocks = uloop_nr_blocks(a->size, a->block_size);
	if (nr_blocks > ULOOP_MAX_BLOCKS)
		return uloop_refuse(-EFBIG, "ADD refused: %llu blocks, at most %llu: use a larger block size",
				    nr_blocks, ULOOP_MAX_BLOCKS);
	if ((a->flags & ULOOP_F_ACCESSED) &&
	    (a->unit_shift > 20 || (nr_blocks >> a->unit_shift) > ULOOP_MAX_UNIT_BITS))
		return uloop_refuse(-ERANGE, "ADD refused: unit shift %u is above 20 or leaves more than %llu units",
				    a->unit_shift, ULOOP_MAX_UNIT_BITS);
	if (a->bitmap_length && a->bitmap_length < DIV_ROUND_UP(nr_blocks, 8))
		return uloop_refuse(-EMSGSIZE, "ADD refused: bitmaps of %llu bytes, %llu needed",
				    a->bitmap_length, DIV_ROUND_UP(nr_blocks, 8));
	if (a->index != ULOOP_INDEX_ANY && a->index >= (u32)uloop_max_devices())
		return uloop_refuse(-ENXIO, "ADD refused: index %u, at most %d devices with max_part=%u",
				    a->index, uloop_max_devices(), max_part);
	return 0;
}

/* Checks the cache file: the fd's file, or an ERR_PTR of the errno, logged. */
static struct file *uloop_add_file(struct uloop_add *a)
{
	struct file *file = fget(a->cache_fd);
	int err = 0;

	if (!file)
		return ERR_PTR(uloop_refuse(-EBADF, "ADD refused: cache fd %d is not open", a->cache_fd));
	if (!S_ISREG(file_inode(file)->i_mode) || !file->f_op->read_iter || !file->f_op->write_iter)
		err = uloop_refuse(-EBADFD, "ADD refused: the cache file is not a regular file with read and write iterators");
	else if (!(file->f_mode & FMODE_READ) ||
		 ((a->flags & ULOOP_F_WRITEBACK) && !(file->f_mode & FMODE_WRITE)))
		err = uloop_refuse(-EACCES, "ADD refused: the cache fd is not open for %s",
				   (a->flags & ULOOP_F_WRITEBACK) ? "reading and writing" : "reading");
	else if (i_size_read(file_inode(file)) < a->size)
		err = uloop_refuse(-EOVERFLOW, "ADD refused: the cache file holds %lld bytes, %llu needed",
				   i_size_read(file_inode(file)), a->size);
	if (err) {
		fput(file);
		return ERR_PTR(err);
	}
	return file;
}

/*
 * ADD. The device is built completely (state loaded, disk added, daemon attached) under an index
 * reserved in the idr with a NULL pointer, and published (idr_replace) last: QUERY, ATTACH and
 * REMOVE never see a half-built device (loop's idr_visible). Partitions are not scanned by
 * add_disk (its reads would need this very daemon, which is inside this ioctl).
 */
static int uloop_add(struct uloop_conn *conn, struct uloop_add __user *uarg)
{
	struct uloop_add a;
	struct uloop_dev *dev;
	struct gendisk *disk;
	struct file *file;
	int err;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return uloop_refuse(-EFAULT, "ADD refused: its argument is not readable");
	err = uloop_add_check(&a);
	if (err)
		return err;
	mutex_lock(&conn->lock);
	if (conn->dev) {
		err = READ_ONCE(conn->dev->dead) ?
		      uloop_refuse(-ENODEV, "ADD refused: this fd's uloop%d was removed: open a new one",
				   conn->dev->index) :
		      uloop_refuse(-EISCONN, "ADD refused: this fd is attached to uloop%d already",
				   conn->dev->index);
		goto out_conn;
	}
	file = uloop_add_file(&a);
	if (IS_ERR(file)) {
		err = PTR_ERR(file);
		goto out_conn;
	}

	err = -ENOMEM;
	dev = kzalloc(sizeof(*dev), GFP_KERNEL);
	if (!dev)
		goto out_fput;
	kref_init(&dev->kref);
	dev->credit = ULOOP_CREDIT_NONE;
	mutex_init(&dev->lock);
	mutex_init(&dev->epoch_mutex);
	mutex_init(&dev->bar_bits_mutex);
	init_waitqueue_head(&dev->busy_wait);
	init_waitqueue_head(&dev->msg_wait);
	init_waitqueue_head(&dev->bar_wait);
	init_waitqueue_head(&dev->inflight_wait);
	spin_lock_init(&dev->inflight_lock);
	INIT_LIST_HEAD(&dev->inflight);
	INIT_LIST_HEAD(&dev->queued);
	INIT_LIST_HEAD(&dev->sent);
	INIT_LIST_HEAD(&dev->claims);
	INIT_LIST_HEAD(&dev->preparing);
	INIT_LIST_HEAD(&dev->holds);
	spin_lock_init(&dev->rq_lock);
	INIT_LIST_HEAD(&dev->rq_list);
	INIT_WORK(&dev->rq_work, uloop_rq_work);
	INIT_WORK(&dev->scan_work, uloop_scan_work);
	dev->index = -1;
	dev->detached_at = jiffies;
	dev->size = a.size;
	dev->block_size = a.block_size;
	dev->block_shift = ilog2(a.block_size);
	dev->flags = a.flags;
	dev->lbs = a.logical_block_size;
	dev->pbs = a.physical_block_size;
	dev->unit_shift = (a.flags & ULOOP_F_ACCESSED) ? a.unit_shift : 0;
	dev->nr_blocks = uloop_nr_blocks(a.size, a.block_size);
	dev->nr_units = DIV_ROUND_UP(dev->nr_blocks, 1ULL << dev->unit_shift);
	dev->io_timeout = min_t(unsigned int, io_timeout_s, INT_MAX / HZ) * HZ;
	if (uloop_alloc_state(dev))
		goto out_free;
	err = ubits_load(&dev->present, a.present_ptr, GFP_KERNEL);
	if (!err)
		err = ubits_load(&dev->dirty, a.dirty_ptr, GFP_KERNEL);
	if (err) {
		uloop_refuse(err, "ADD refused: the %s bitmap could not be loaded",
			     err == -EFAULT ? "given" : "kernel's");
		goto out_free;
	}
	/* without ZERO, dirty implies present (ABI 1); with it, dirty alone is a zero block */
	if (!(a.flags & ULOOP_F_ZERO)) {
		struct ubits copy;

		err = ubits_init(&copy, dev->nr_blocks) ?: ubits_copy(&copy, &dev->dirty, GFP_KERNEL);
		if (!err)
			ubits_merge(&dev->present, &copy);
		ubits_destroy(&copy);
		if (err)
			goto out_free;
	}
	dev->nr_present = ubits_count(&dev->present, 0, dev->nr_blocks);
	dev->nr_dirty = ubits_count(&dev->dirty, 0, dev->nr_blocks);
	dev->nr_zero = ubits_count_andnot(&dev->dirty, &dev->present, 0, dev->nr_blocks);

	mutex_lock(&uloop_ctl_mutex);
	if (a.index == ULOOP_INDEX_ANY)
		err = idr_alloc(&uloop_idr, NULL, 0, uloop_max_devices(), GFP_KERNEL);
	else
		err = idr_alloc(&uloop_idr, NULL, a.index, a.index + 1, GFP_KERNEL);
	mutex_unlock(&uloop_ctl_mutex);
	if (err < 0) {
		if (err == -ENOSPC && a.index != ULOOP_INDEX_ANY)
			err = uloop_refuse(-EEXIST, "ADD refused: /dev/uloop%u exists", a.index);
		else if (err == -ENOSPC)
			err = uloop_refuse(-ENOSPC, "ADD refused: all %d device indexes are taken",
					   uloop_max_devices());
		goto out_free;
	}
	dev->index = err;

	err = -ENOMEM;
	dev->wq = alloc_workqueue("uloop%d", WQ_MEM_RECLAIM | WQ_UNBOUND, 0, dev->index);
	if (!dev->wq)
		goto out_idr;
	dev->wait_wq = alloc_workqueue("uloop%d-wait", WQ_MEM_RECLAIM | WQ_UNBOUND, 0, dev->index);
	if (!dev->wait_wq)
		goto out_wq;

	dev->tag_set.ops = &uloop_mq_ops;
	dev->tag_set.nr_hw_queues = 1;
	dev->tag_set.queue_depth = 128;
	dev->tag_set.numa_node = NUMA_NO_NODE;
	dev->tag_set.cmd_size = sizeof(struct uloop_cmd);
	dev->tag_set.timeout = dev->io_timeout;
	/* no I/O scheduler by default, as loop: the cache file's own path does the ordering */
	dev->tag_set.flags = BLK_MQ_F_NO_SCHED_BY_DEFAULT;
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 14, 0)
	dev->tag_set.flags |= BLK_MQ_F_SHOULD_MERGE; /* 6.14 made merging the default, removed the flag */
#endif
	dev->tag_set.driver_data = dev;
	err = blk_mq_alloc_tag_set(&dev->tag_set);
	if (err)
		goto out_wq;

	disk = uloop_alloc_disk(dev);
	if (IS_ERR(disk)) {
		err = PTR_ERR(disk);
		goto out_tags;
	}
	disk->major = uloop_major;
	disk->first_minor = dev->index << part_shift;
	disk->minors = 1 << part_shift;
	disk->fops = &uloop_fops;
	disk->private_data = dev;
	snprintf(disk->disk_name, DISK_NAME_LEN, "uloop%d", dev->index);
	set_capacity(disk, a.size >> SECTOR_SHIFT);
	if (!(a.flags & ULOOP_F_WRITEBACK))
		set_disk_ro(disk, true);
	set_bit(GD_SUPPRESS_PART_SCAN, &disk->state);
	dev->disk = disk;
	dev->cache = file;
	err = add_disk(disk);
	if (err)
		goto out_disk;
	clear_bit(GD_SUPPRESS_PART_SCAN, &disk->state); /* BLKRRPART works from now on */

	/* The calling fd is the device's daemon from now on. */
	kref_get(&dev->kref);
	mutex_lock(&dev->lock);
	conn->dev = dev;
	dev->daemon = conn;
	mutex_unlock(&dev->lock);
	/* before publishing: a REMOVE that finds the device must see the scan it would race */
	if (a.flags & ULOOP_F_PARTSCAN)
		WRITE_ONCE(dev->scanning, true);
	__module_get(THIS_MODULE);
	mutex_lock(&uloop_ctl_mutex);
	idr_replace(&uloop_idr, dev, dev->index);
	mutex_unlock(&uloop_ctl_mutex);
	mutex_unlock(&conn->lock);

	if (a.flags & ULOOP_F_PARTSCAN)
		queue_work(dev->wait_wq, &dev->scan_work);
	a.index = dev->index;
	if (put_user(a.index, &uarg->index))
		pr_warn("uloop%d: could not return the index to the caller\n", dev->index);
	return 0;

out_disk:
	dev->cache = NULL;
	put_disk(disk);
out_tags:
	blk_mq_free_tag_set(&dev->tag_set);
out_wq:
	if (dev->wait_wq)
		destroy_workqueue(dev->wait_wq);
	destroy_workqueue(dev->wq);
out_idr:
	mutex_lock(&uloop_ctl_mutex);
	idr_remove(&uloop_idr, dev->index);
	mutex_unlock(&uloop_ctl_mutex);
out_free:
	kref_put(&dev->kref, uloop_free);
out_fput:
	fput(file);
out_conn:
	mutex_unlock(&conn->lock);
	return err;
}

/*
 * REMOVE. Refused while anything holds the disk open (checked under the disk's open_mutex,
 * taken with trylock so that a daemon never waits here for an open or a partition scan that
 * needs its own answers); then `deleting` fails later opens, and the device is hidden from the
 * idr (its index stays reserved until the end, so a new ADD of that N cannot collide with the
 * disk still being deleted). Then: upcalls and claims fail, del_gendisk (waits for the requests,
 * which end quickly now), the workqueue, the tag set, the index, the disk's last reference, the
 * cache file, the module pin; the memory goes with the last kref (an attached fd keeps it).
 */
static int uloop_remove(u32 index)
{
	struct uloop_dev *dev;
	bool open;

	mutex_lock(&uloop_ctl_mutex);
	dev = idr_find(&uloop_idr, index);
	if (!dev) {
		mutex_unlock(&uloop_ctl_mutex);
		return uloop_refuse(-ENODEV, "REMOVE refused: no device uloop%u", index);
	}
	if (!mutex_trylock(&dev->disk->open_mutex)) {
		mutex_unlock(&uloop_ctl_mutex);
		return uloop_refuse(-EBUSY, "REMOVE refused: uloop%u is being opened or scanned; try again",
				    index);
	}
	open = disk_openers(dev->disk) || READ_ONCE(dev->scanning);
	if (!open)
		WRITE_ONCE(dev->deleting, true);
	mutex_unlock(&dev->disk->open_mutex);
	if (open) {
		mutex_unlock(&uloop_ctl_mutex);
		return uloop_refuse(-EBUSY, "REMOVE refused: uloop%u is open or its partitions are being scanned",
				    index);
	}
	idr_replace(&uloop_idr, NULL, index);
	mutex_unlock(&uloop_ctl_mutex);

	mutex_lock(&dev->lock);
	dev->dead = true;
	uloop_fail_all(dev);
	uloop_drop_claims(dev);
	uloop_hold_release_all(dev);
	mutex_unlock(&dev->lock);
	wake_up_all(&dev->msg_wait);
	wake_up_all(&dev->busy_wait);
	wake_up_all(&dev->bar_wait);
	wake_up_all(&dev->inflight_wait);

	del_gendisk(dev->disk);
	destroy_workqueue(dev->wait_wq); /* del_gendisk ended every request: nothing queues now */
	destroy_workqueue(dev->wq);
	WARN_ON_ONCE(!list_empty(&dev->rq_list));
	blk_mq_free_tag_set(&dev->tag_set);
	mutex_lock(&uloop_ctl_mutex);
	idr_remove(&uloop_idr, index);
	mutex_unlock(&uloop_ctl_mutex);
	put_disk(dev->disk);
	fput(dev->cache);
	dev->cache = NULL;
	kref_put(&dev->kref, uloop_free);
	module_put(THIS_MODULE);
	return 0;
}

/* ---- the control device ------------------------------------------------------------------------ */

static struct uloop_dev *uloop_get(u32 index)
{
	struct uloop_dev *dev;

	mutex_lock(&uloop_ctl_mutex);
	dev = idr_find(&uloop_idr, index);
	if (dev)
		kref_get(&dev->kref);
	mutex_unlock(&uloop_ctl_mutex);
	return dev;
}

static int uloop_get_features(struct uloop_features __user *uarg)
{
	struct uloop_features f = {
		.version = ULOOP_ABI_VERSION,
		.max_part = (1U << part_shift) - 1,
		.features = ULOOP_FEAT_COUNTERS | ULOOP_FEAT_STICKY_ERROR | ULOOP_FEAT_IO_TIMEOUT |
			    ULOOP_FEAT_PRESERVE | ULOOP_FEAT_ZERO | ULOOP_FEAT_CLAIM |
			    ULOOP_FEAT_EVICT | ULOOP_FEAT_ACCESSED | ULOOP_FEAT_PARTITIONS |
			    ULOOP_FEAT_SECTOR_SIZE | ULOOP_FEAT_REPLY_CHECK | ULOOP_FEAT_CREDIT |
			    ULOOP_FEAT_BARRIER,
		.max_devices = uloop_max_devices(),
		.io_timeout_s = io_timeout_s,
		.max_blocks = ULOOP_MAX_BLOCKS,
	};

	return copy_to_user(uarg, &f, sizeof(f)) ? -EFAULT : 0;
}

static int uloop_query(struct uloop_info __user *uarg)
{
	struct uloop_info info;
	struct uloop_dev *dev;
	struct uloop_upcall *up;
	u32 waiting = 0;

	if (copy_from_user(&info, uarg, sizeof(info)))
		return uloop_refuse(-EFAULT, "QUERY refused: its argument is not readable");
	dev = uloop_get(info.index);
	if (!dev)
		return uloop_refuse(-ENODEV, "QUERY refused: no device uloop%u", info.index);
	memset(&info, 0, sizeof(info));
	info.version = ULOOP_ABI_VERSION;
	info.index = dev->index;
	info.size = dev->size;
	info.block_size = dev->block_size;
	info.flags = dev->flags;
	info.nr_blocks = dev->nr_blocks;
	info.logical_block_size = dev->lbs;
	info.physical_block_size = dev->pbs;
	info.unit_shift = dev->unit_shift;
	mutex_lock(&dev->lock);
	info.present_blocks = dev->nr_present;
	info.dirty_blocks = dev->nr_dirty;
	info.zero_blocks = dev->nr_zero;
	info.pending_blocks = dev->nr_pending;
	info.unasked_blocks = uloop_unasked(dev);
	info.credit_limit = dev->credit;
	info.claimed_blocks = dev->nr_claimed;
	info.epoch = dev->epoch;
	info.attached = dev->daemon != NULL;
	list_for_each_entry(up, &dev->queued, node)
		waiting++;
	list_for_each_entry(up, &dev->sent, node)
		waiting++;
	info.waiting = waiting;
	info.error = dev->error;
	info.state = (dev->epoch_open ? ULOOP_STATE_EPOCH_OPEN : 0) |
		     (dev->epoch_open && dev->epoch_failed ? ULOOP_STATE_EPOCH_FAILED : 0) |
		     (READ_ONCE(dev->scanning) ? ULOOP_STATE_SCANNING : 0);
	info.mem_bytes = uloop_mem(dev);
	mutex_unlock(&dev->lock);
	info.inflight = READ_ONCE(dev->nr_inflight);
	info.read_hits = atomic64_read(&dev->stats.read_hits);
	info.read_misses = atomic64_read(&dev->stats.read_misses);
	info.write_hits = atomic64_read(&dev->stats.write_hits);
	info.write_upcalls = atomic64_read(&dev->stats.write_upcalls);
	info.read_bytes = atomic64_read(&dev->stats.read_bytes);
	info.write_bytes = atomic64_read(&dev->stats.write_bytes);
	info.zero_bytes = atomic64_read(&dev->stats.zero_bytes);
	info.flushes = atomic64_read(&dev->stats.flushes);
	info.barriers = atomic64_read(&dev->stats.barriers);
	info.timeouts = atomic64_read(&dev->stats.timeouts);
	info.io_errors = atomic64_read(&dev->stats.io_errors);
	info.late_replies = atomic64_read(&dev->stats.late_replies);
	kref_put(&dev->kref, uloop_free);
	return copy_to_user(uarg, &info, sizeof(info)) ? -EFAULT : 0;
}

static int uloop_attach(struct uloop_conn *conn, struct uloop_attach __user *uarg)
{
	struct uloop_attach a;
	struct uloop_dev *dev;
	int err = 0;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return uloop_refuse(-EFAULT, "ATTACH refused: its argument is not readable");
	if (a.version != ULOOP_ABI_VERSION)
		return uloop_refuse(-EPROTO, "ATTACH refused: the daemon speaks ABI %u, this module %u: rebuild or reload one of them",
				    a.version, ULOOP_ABI_VERSION);
	mutex_lock(&conn->lock);
	if (conn->dev) {
		err = READ_ONCE(conn->dev->dead) ?
		      uloop_refuse(-ENODEV, "ATTACH refused: this fd's uloop%d was removed: open a new one",
				   conn->dev->index) :
		      uloop_refuse(-EISCONN, "ATTACH refused: this fd is attached to uloop%d already",
				   conn->dev->index);
		goto out;
	}
	dev = uloop_get(a.index);
	if (!dev) {
		err = uloop_refuse(-ENODEV, "ATTACH refused: no device uloop%u", a.index);
		goto out;
	}
	mutex_lock(&dev->lock);
	if (dev->dead || dev->daemon) {
		err = dev->dead ? -ENODEV : -EBUSY;
	} else {
		dev->daemon = conn;
		conn->dev = dev; /* keeps the reference uloop_get took */
		dev->credit = ULOOP_CREDIT_NONE; /* the new daemon sets its own (CREDIT) */
		uloop_rooms_end(dev); /* the dead daemon's ROOMs: no limit now */
	}
	mutex_unlock(&dev->lock);
	if (err) {
		uloop_refuse(err, "ATTACH refused: uloop%u %s", a.index,
			     err == -ENODEV ? "is being removed" : "has a daemon attached");
		kref_put(&dev->kref, uloop_free);
	} else {
		wake_up_interruptible(&dev->msg_wait);
	}
out:
	mutex_unlock(&conn->lock);
	return err;
}

static int uloop_barrier_bits(struct uloop_dev *dev, struct uloop_barrier_bits __user *uarg)
{
	u64 bytes = DIV_ROUND_UP(dev->nr_blocks, 8);
	struct uloop_barrier_bits a;
	struct uloop_upcall *up;
	int err = -ENOENT;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return uloop_refuse(-EFAULT, "BARRIER_BITS refused: its argument is not readable");
	if (a.length < bytes)
		return uloop_refuse(-EMSGSIZE, "BARRIER_BITS refused: buffers of %llu bytes, %llu needed",
				    a.length, bytes);
	mutex_lock(&dev->bar_bits_mutex); /* the barrier holder keeps bar_pending until we are done */
	mutex_lock(&dev->lock);
	list_for_each_entry(up, &dev->sent, node) {
		if (up->msg.id == a.id && up->msg.type == ULOOP_MSG_BARRIER) {
			err = 0;
			break;
		}
	}
	mutex_unlock(&dev->lock);
	if (!err && (ubits_store(&dev->bar_pending, a.present_ptr) ||
		     ubits_store(&dev->bar_pending, a.dirty_ptr)))
		err = uloop_refuse(-EFAULT, "BARRIER_BITS refused: the buffers are not writable");
	mutex_unlock(&dev->bar_bits_mutex);
	if (err == -ENOENT)
		uloop_refuse(err, "uloop%d: BARRIER_BITS refused: %llu is not an outstanding barrier",
			     dev->index, a.id);
	return err;
}

/* Ends the open epoch: its rewritten, snapshot and preserved sets go. dev->lock held. */
static void uloop_epoch_end(struct uloop_dev *dev)
{
	dev->epoch_open = false;
	dev->epoch_failed = false;
	ubits_zero(&dev->rewritten);
	ubits_zero(&dev->snap);
	ubits_zero(&dev->done);
}

/*
 * EPOCH_BEGIN: snap = dirty, atomically under dev->lock (a pass over the page pointers plus a copy
 * of the mixed pages of dirty), the writes in flight marked rewritten, the epoch opened; then the
 * snapshot is copied out without the lock (it changes only under epoch_mutex, which we hold).
 *
 * Why COMMIT is right against concurrent writes. A write to a block changes the cache file in one
 * of these ways: through an INTENT (the block was clean: uloop_prepare asks the daemon, sets the
 * dirty bit, then loops once more), directly (the block was dirty, or missing and covered whole),
 * or as a ZERO. In each case the *last* pass of uloop_prepare (or of uloop_zero_blocks) decides
 * "no daemon round trip needed" and, in the same dev->lock section, marks the blocks `rewritten`
 * if an epoch is open and puts the request on dev->inflight, where it stays until its cache-file
 * I/O completed. So under dev->lock:
 *  - a write whose last pass ran before BEGIN either completed before BEGIN (its data is in the
 *    page cache when the flusher reads; the daemon syncs the cache file after BEGIN, so that data
 *    is durable before COMMIT), or is still on dev->inflight and BEGIN marks it rewritten;
 *  - a write whose last pass runs between BEGIN and COMMIT marks itself rewritten;
 *  - a write whose last pass runs after COMMIT cleared its block finds it clean and needs an
 *    INTENT, whose answer comes after the daemon cleared the store's bit too (rule 3 holds again).
 * COMMIT clears only flushed & dirty & ~rewritten, so every block it clears holds exactly the
 * content the flusher could have read after BEGIN, which the daemon wrote to the source and synced
 * before COMMIT (invariant 4), and is durable in the cache (invariant 2). A block rewritten during
 * the epoch keeps its dirty bit, whatever the flusher read: the next epoch writes it again.
 * COMMIT may drop dev->lock between pages: the epoch stays open until it ends, so a write whose
 * last pass falls between two pages either finds its block already cleared (clean: INTENT) or
 * marks it rewritten before COMMIT reaches it.
 *
 * Point in time (ULOOP_F_PRESERVE), invariant 7: the flusher must copy each snapshot block's
 * content as of BEGIN. Every change to a block's cache content after BEGIN that was not already in
 * flight at BEGIN passes a last prepare pass after BEGIN, under dev->lock; that pass finds the
 * block in snap and not in done, and sends PRESERVE first, holding the block busy (no other
 * request's last pass can run on it) until the daemon has copied the epoch's version aside. Only
 * three things add a block to done: that answer (for this epoch: an answer for an older epoch is
 * ignored), EPOCH_RELEASE (the daemon says its flusher has read the block, and a write waiting for
 * that read is the daemon's to hold back), and nothing else; `done` and `snap` are reset only at
 * the epoch's end. MISS, FILLED and CLAIM touch only blocks that are not present, and dirty blocks
 * are never EVICTed, so none of them changes a snapshot block. Writes in flight at BEGIN may land
 * after it: as for a crash, each of their sectors is old or new in the epoch's image. A PRESERVE
 * the daemon fails lets the write go on and marks the epoch failed: its COMMIT clears nothing.
 */
static int uloop_epoch_begin(struct uloop_dev *dev, struct uloop_epoch __user *uarg)
{
	u64 bytes = DIV_ROUND_UP(dev->nr_blocks, 8);
	struct uloop_epoch a;
	struct uloop_cmd *cmd;
	int err = 0;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return uloop_refuse(-EFAULT, "EPOCH_BEGIN refused: its argument is not readable");
	if (a.length < bytes)
		return uloop_refuse(-EMSGSIZE, "EPOCH_BEGIN refused: a buffer of %llu bytes, %llu needed",
				    a.length, bytes);
	mutex_lock(&dev->epoch_mutex);
	mutex_lock(&dev->lock);
	if (dev->error) {
		mutex_unlock(&dev->lock);
		err = uloop_refuse(-EIO, "uloop%d: EPOCH_BEGIN refused: the cache file failed to sync (CLEAR_ERROR)",
				   dev->index);
		goto out;
	}
	uloop_epoch_end(dev);
	err = ubits_copy(&dev->snap, &dev->dirty, GFP_NOIO);
	if (err) {
		mutex_unlock(&dev->lock);
		goto out;
	}
	/* writes in flight now count as touching their blocks (no allocation inside ubits_set:
	 * reserved first; with the spinlock held, atomically) */
	spin_lock_irq(&dev->inflight_lock);
	list_for_each_entry(cmd, &dev->inflight, inflight) {
		if (!cmd->write)
			continue;
		err = ubits_reserve(&dev->rewritten, cmd->first, cmd->last + 1, true,
				    GFP_ATOMIC | __GFP_NOWARN);
		if (err)
			break;
		ubits_set(&dev->rewritten, cmd->first, cmd->last + 1);
	}
	spin_unlock_irq(&dev->inflight_lock);
	if (err) {
		uloop_epoch_end(dev);
		mutex_unlock(&dev->lock);
		goto out;
	}
	a.epoch = ++dev->epoch;
	dev->epoch_open = true;
	mutex_unlock(&dev->lock);
	if (ubits_store(&dev->snap, a.dirty_ptr) || copy_to_user(uarg, &a, sizeof(a)))
		err = uloop_refuse(-EFAULT, "EPOCH_BEGIN: the buffer is not writable (the epoch is open)");
	if (!(dev->flags & ULOOP_F_PRESERVE)) {
		mutex_lock(&dev->lock);
		ubits_zero(&dev->snap); /* only PRESERVE needs it after the copy */
		mutex_unlock(&dev->lock);
	}
out:
	mutex_unlock(&dev->epoch_mutex);
	return err;
}

static int uloop_epoch_commit(struct uloop_dev *dev, struct uloop_epoch __user *uarg)
{
	u64 bytes = DIV_ROUND_UP(dev->nr_blocks, 8), p, cleared = 0, zero = 0;
	struct uloop_epoch a;
	struct ubits flushed;
	unsigned long *scratch = NULL;
	int err;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return uloop_refuse(-EFAULT, "EPOCH_COMMIT refused: its argument is not readable");
	if (a.length < bytes)
		return uloop_refuse(-EMSGSIZE, "EPOCH_COMMIT refused: a buffer of %llu bytes, %llu needed",
				    a.length, bytes);
	mutex_lock(&dev->epoch_mutex);
	err = ubits_init(&flushed, dev->nr_blocks) ?: ubits_load(&flushed, a.dirty_ptr, GFP_NOIO);
	if (err) {
		if (err == -EFAULT)
			uloop_refuse(err, "EPOCH_COMMIT refused: the flushed set is not readable");
		goto out;
	}
	mutex_lock(&dev->lock);
	if (!dev->epoch_open || a.epoch != dev->epoch) {
		mutex_unlock(&dev->lock);
		err = uloop_refuse(-ESTALE, "uloop%d: EPOCH_COMMIT refused: epoch %llu is not the open one",
				   dev->index, a.epoch);
		goto out;
	}
	if (dev->error) {
		uloop_epoch_end(dev); /* else writes keep asking PRESERVEs for it until the next BEGIN */
		mutex_unlock(&dev->lock);
		err = uloop_refuse(-EIO, "uloop%d: EPOCH_COMMIT refused: the cache file failed to sync (CLEAR_ERROR)",
				   dev->index);
		goto out;
	}
	if (dev->epoch_failed) {
		uloop_epoch_end(dev);
		mutex_unlock(&dev->lock);
		err = uloop_refuse(-ECANCELED, "uloop%d: EPOCH_COMMIT refused: a PRESERVE failed in epoch %llu; nothing cleared",
				   dev->index, a.epoch);
		goto out;
	}
	for (p = 0; p < flushed.nr_pages; p++) {
		const unsigned long *f = ubits_ro(&flushed, p), *d, *r, *pr, *pe, *bp;
		unsigned long *dp;
		bool any = false;
		size_t w;

		if (!flushed.pages[p])
			continue;
		if (!dev->dirty.pages[p]) { /* nothing dirty there: nothing cleared */
			ubits_put_page(&flushed, p, NULL);
			continue;
		}
		if (!scratch)
			scratch = (unsigned long *)__get_free_page(GFP_NOIO | __GFP_NOFAIL);
		d = ubits_ro(&dev->dirty, p);
		r = ubits_ro(&dev->rewritten, p);
		pr = ubits_ro(&dev->present, p);
		pe = ubits_ro(&dev->pending, p);
		bp = ubits_ro(&dev->bar_pending, p);
		for (w = 0; w < UBITS_PAGE_WORDS; w++) {
			/* not pending ones: the store has not recorded them yet, and their barrier
			 * will record them dirty (the kernel would then call clean what is dirty) */
			scratch[w] = f[w] & d[w] & ~r[w] & ~pe[w] & ~bp[w];
			if (scratch[w]) {
				any = true;
				cleared += hweight_long(scratch[w]);
				zero += hweight_long(scratch[w] & ~pr[w]);
			}
		}
		if (any) {
			dp = ubits_mixed(&dev->dirty, p, GFP_NOIO | __GFP_NOFAIL);
			for (w = 0; w < UBITS_PAGE_WORDS; w++)
				dp[w] &= ~scratch[w];
			if (ubits_page_uniform(dp, 0))
				ubits_put_page(&dev->dirty, p, NULL);
		}
		/* the flushed page becomes the cleared set */
		ubits_put_page(&flushed, p, NULL);
		if (any) {
			ubits_install(&flushed, p, scratch);
			scratch = NULL;
		}
		if (!(p & 63)) {
			mutex_unlock(&dev->lock);
			cond_resched();
			mutex_lock(&dev->lock);
		}
	}
	dev->nr_dirty -= cleared;
	dev->nr_zero -= zero;
	uloop_epoch_end(dev);
	mutex_unlock(&dev->lock);
	a.cleared = cleared;
	if (ubits_store(&flushed, a.dirty_ptr) || copy_to_user(uarg, &a, sizeof(a)))
		err = uloop_refuse(-EFAULT, "EPOCH_COMMIT: the buffer is not writable (%llu blocks were cleared)",
				   cleared);
out:
	if (scratch)
		free_page((unsigned long)scratch);
	ubits_destroy(&flushed);
	mutex_unlock(&dev->epoch_mutex);
	return err;
}

/* A request past its last pass touches a block of `lost`. */
static bool uloop_inflight_on_lost(struct uloop_dev *dev)
{
	struct uloop_cmd *cmd;
	bool on = false;

	spin_lock_irq(&dev->inflight_lock);
	list_for_each_entry(cmd, &dev->inflight, inflight) {
		if (ubits_find(&dev->lost, cmd->first, cmd->last + 1, true) <= cmd->last) {
			on = true;
			break;
		}
	}
	spin_unlock_irq(&dev->inflight_lock);
	return on;
}

/* CLEAR_ERROR gave up: the lost blocks it took busy are free again. dev->lock not held. */
static void uloop_lost_unbusy(struct uloop_dev *dev)
{
	u64 b, e;

	mutex_lock(&dev->lock);
	for (b = ubits_find(&dev->lost, 0, dev->nr_blocks, true); b < dev->nr_blocks;
	     b = ubits_find(&dev->lost, e, dev->nr_blocks, true)) {
		e = ubits_find(&dev->lost, b, dev->nr_blocks, false);
		ubits_clear(&dev->busy, b, e);
	}
	dev->busy_seq++;
	mutex_unlock(&dev->lock);
	wake_up_all(&dev->busy_wait);
}

/*
 * Before CLEAR_ERROR drops the lost blocks (present and dirty go): takes them busy, once no one
 * else has them busy, so that no new request reaches them, then waits for the requests already
 * past their last pass on them. A write still writing a dropped block, or its completion, must
 * not meet a MISS filling that block from the source. `lost` is stable: the error is set and
 * bar_bits_mutex held. Returns 0 with dev->lock held, or -EINTR (a fatal signal) with nothing
 * changed and dev->lock not held. The wait ends when the requests do: those on the daemon time
 * out (io_timeout_s) if it does not answer them meanwhile.
 */
static int uloop_lost_quiesce(struct uloop_dev *dev)
{
	u64 b, e, seq;
	int err;

	for (;;) {
		mutex_lock(&dev->lock);
		for (b = ubits_find(&dev->lost, 0, dev->nr_blocks, true); b < dev->nr_blocks;
		     b = ubits_find(&dev->lost, e, dev->nr_blocks, true)) {
			e = ubits_find(&dev->lost, b, dev->nr_blocks, false);
			if (ubits_find(&dev->busy, b, e, true) < e)
				break;
		}
		if (b >= dev->nr_blocks)
			break;
		seq = dev->busy_seq;
		mutex_unlock(&dev->lock);
		if (wait_event_killable(dev->busy_wait, READ_ONCE(dev->busy_seq) != seq))
			return -EINTR;
	}
	for (b = ubits_find(&dev->lost, 0, dev->nr_blocks, true); b < dev->nr_blocks;
	     b = ubits_find(&dev->lost, e, dev->nr_blocks, true)) {
		e = ubits_find(&dev->lost, b, dev->nr_blocks, false);
		ubits_set(&dev->busy, b, e);
	}
	mutex_unlock(&dev->lock);
	err = wait_event_killable(dev->inflight_wait, !uloop_inflight_on_lost(dev));
	if (err) {
		uloop_lost_unbusy(dev);
		return -EINTR;
	}
	mutex_lock(&dev->lock);
	return 0;
}

static int uloop_clear_error(struct uloop_dev *dev, struct uloop_clear_error __user *uarg)
{
	struct uloop_clear_error a;
	u64 bytes = DIV_ROUND_UP(dev->nr_blocks, 8), b, e;
	struct file *cache;
	int err = 0;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return uloop_refuse(-EFAULT, "CLEAR_ERROR refused: its argument is not readable");
	if (a.dropped_ptr && a.length < bytes)
		return uloop_refuse(-EMSGSIZE, "CLEAR_ERROR refused: a buffer of %llu bytes, %llu needed",
				    a.length, bytes);
	/* one CLEAR_ERROR at a time; while the error is set no FLUSH touches `lost` */
	mutex_lock(&dev->bar_bits_mutex);
	mutex_lock(&dev->lock);
	a.error = dev->error;
	a.dropped = 0;
	/* REMOVE from another fd may put the cache file (dev->cache = NULL) once the ioctl's
	 * dead check has passed: sync through a reference taken while it cannot */
	if (dev->dead) {
		mutex_unlock(&dev->lock);
		err = uloop_refuse(-ENODEV, "uloop%d: CLEAR_ERROR refused: device removed", dev->index);
		goto out;
	}
	cache = a.error ? get_file(dev->cache) : NULL;
	mutex_unlock(&dev->lock);
	if (!a.error)
		goto out;
	err = vfs_fsync(cache, 1);
	fput(cache);
	if (err) {
		/* this sync may have lost what was written whole since the FLUSH's failed (and
		 * reports it once): a retry must not succeed over it */
		mutex_lock(&dev->lock);
		uloop_pending_lost(dev);
		mutex_unlock(&dev->lock);
		err = uloop_refuse(-EIO, "uloop%d: CLEAR_ERROR refused: the cache file still fails to sync (%d)",
				   dev->index, err);
		goto out;
	}
	err = uloop_lost_quiesce(dev);
	if (err) {
		err = uloop_refuse(err, "uloop%d: CLEAR_ERROR interrupted; nothing dropped", dev->index);
		goto out;
	}
	mutex_unlock(&dev->lock);
	if (a.dropped_ptr && ubits_store(&dev->lost, a.dropped_ptr)) {
		uloop_lost_unbusy(dev);
		err = uloop_refuse(-EFAULT, "CLEAR_ERROR refused: the buffer is not writable");
		goto out;
	}
	mutex_lock(&dev->lock);
	/* the lost blocks are busy (ours) and no request is on them */
	for (b = ubits_find(&dev->lost, 0, dev->nr_blocks, true); b < dev->nr_blocks;
	     b = ubits_find(&dev->lost, e, dev->nr_blocks, true)) {
		e = ubits_find(&dev->lost, b, dev->nr_blocks, false);
		ubits_clear(&dev->busy, b, e);
		dev->nr_zero -= ubits_count_andnot(&dev->dirty, &dev->present, b, e);
		dev->nr_present -= ubits_clear(&dev->present, b, e);
		dev->nr_dirty -= ubits_clear(&dev->dirty, b, e);
		a.dropped += e - b;
	}
	ubits_zero(&dev->lost);
	dev->nr_lost = 0;
	dev->error = 0;
	dev->busy_seq++;
	mutex_unlock(&dev->lock);
	wake_up_all(&dev->busy_wait);
	pr_info("uloop%d: the daemon cleared the sticky error; %llu blocks written whole before the failed sync were dropped\n",
		dev->index, a.dropped);
out:
	mutex_unlock(&dev->bar_bits_mutex);
	if (!err && copy_to_user(uarg, &a, sizeof(a)))
		err = -EFAULT;
	return err;
}

/* Checks a block-range ioctl's argument against `limit` items (blocks or units). */
static int uloop_blocks_check(struct uloop_dev *dev, const char *name, struct uloop_blocks *a,
			      u64 limit, u64 max_count)
{
	if (a->__reserved)
		return uloop_refuse(-EOPNOTSUPP, "uloop%d: %s refused: reserved field set", dev->index, name);
	if (!a->count || a->count > max_count || a->first >= limit || a->count > limit - a->first)
		return uloop_refuse(-EINVAL, "uloop%d: %s refused: range %llu+%llu is empty, beyond %llu or over %llu",
				    dev->index, name, a->first, a->count, limit, max_count);
	return 0;
}

static void *uloop_bits_alloc(u64 count)
{
	return kvzalloc(BITS_TO_LONGS(count) * sizeof(long), GFP_KERNEL);
}

static int uloop_bits_in(unsigned long *bits, u64 uptr, u64 count)
{
	if (copy_from_user(bits, u64_to_user_ptr(uptr), DIV_ROUND_UP(count, 8)))
		return -EFAULT;
	if (count % BITS_PER_LONG)
		bits[count / BITS_PER_LONG] &= BITMAP_LAST_WORD_MASK(count);
	return 0;
}

static int uloop_claim(struct uloop_dev *dev, struct uloop_blocks __user *uarg)
{
	struct uloop_blocks a;
	struct uloop_claim *cl;
	u64 i, n = 0;
	int err;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return uloop_refuse(-EFAULT, "CLAIM refused: its argument is not readable");
	err = uloop_blocks_check(dev, "CLAIM", &a, dev->nr_blocks, ULOOP_MAX_RANGE_BLOCKS);
	if (err)
		return err;
	cl = kvzalloc(struct_size(cl, bits, BITS_TO_LONGS(a.count)), GFP_KERNEL);
	if (!cl)
		return -ENOMEM;
	cl->first = a.first;
	cl->count = a.count;
	mutex_lock(&dev->lock);
	if (dev->dead || dev->nr_claims >= ULOOP_MAX_CLAIMS) {
		err = dev->dead ? -ENODEV : -EAGAIN;
		mutex_unlock(&dev->lock);
		kvfree(cl);
		return uloop_refuse(err, "uloop%d: CLAIM refused: %s", dev->index,
				    err == -ENODEV ? "device removed" : "64 claims outstanding");
	}
	for (i = ubits_find(&dev->present, a.first, a.first + a.count, false); i < a.first + a.count;
	     i = ubits_find(&dev->present, i + 1, a.first + a.count, false)) {
		if (ubits_test(&dev->dirty, i) || ubits_test(&dev->busy, i))
			continue;
		ubits_set(&dev->busy, i, i + 1);
		__set_bit(i - a.first, cl->bits);
		n++;
	}
	mutex_unlock(&dev->lock);
	/* copied out before the claim is listed: until then no FILLED or detach can end it (the
	 * fd is held by this ioctl); a REMOVE meanwhile is seen below */
	a.done = n;
	a.id = 0;
	if (copy_to_user(u64_to_user_ptr(a.bits_ptr), cl->bits, DIV_ROUND_UP(a.count, 8)))
		err = -EFAULT;
	mutex_lock(&dev->lock);
	if (!err && n && !dev->dead) {
		cl->id = a.id = ++dev->next_claim_id;
		dev->nr_claims++;
		dev->nr_claimed += n;
		list_add_tail(&cl->node, &dev->claims);
		cl = NULL;
	} else if (n) {
		for_each_set_bit(i, cl->bits, a.count)
			ubits_clear(&dev->busy, a.first + i, a.first + i + 1);
		dev->busy_seq++;
		a.done = 0;
	}
	mutex_unlock(&dev->lock);
	if (n)
		wake_up_all(&dev->busy_wait);
	kvfree(cl);
	if (err)
		return uloop_refuse(err, "CLAIM refused: the bitmap is not writable");
	if (copy_to_user(uarg, &a, sizeof(a))) /* the claim stands; FILLED by its id ends it */
		return uloop_refuse(-EFAULT, "CLAIM: the result is not writable (claim %llu stands)", a.id);
	return 0;
}

static int uloop_filled(struct uloop_dev *dev, struct uloop_blocks __user *uarg)
{
	struct uloop_blocks a;
	struct uloop_claim *cl, *found = NULL;
	unsigned long *filled;
	u64 i, n = 0;
	int err;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return uloop_refuse(-EFAULT, "FILLED refused: its argument is not readable");
	err = uloop_blocks_check(dev, "FILLED", &a, dev->nr_blocks, ULOOP_MAX_RANGE_BLOCKS);
	if (err)
		return err;
	filled = uloop_bits_alloc(a.count);
	if (!filled)
		return -ENOMEM;
	if (uloop_bits_in(filled, a.bits_ptr, a.count)) {
		kvfree(filled);
		return uloop_refuse(-EFAULT, "FILLED refused: the bitmap is not readable");
	}
	mutex_lock(&dev->lock);
	list_for_each_entry(cl, &dev->claims, node) {
		if (cl->id == a.id && cl->first == a.first && cl->count == a.count) {
			found = cl;
			break;
		}
	}
	if (found) {
		list_del(&found->node);
		dev->nr_claims--;
		for_each_set_bit(i, found->bits, found->count) {
			dev->nr_claimed--;
			if (test_bit(i, filled)) {
				uloop_mark_present(dev, found->first + i, found->first + i + 1);
				n++;
			}
			ubits_clear(&dev->busy, found->first + i, found->first + i + 1);
		}
		dev->busy_seq++;
	}
	mutex_unlock(&dev->lock);
	kvfree(filled);
	if (!found)
		return uloop_refuse(-ENOENT, "uloop%d: FILLED refused: no claim %llu over %llu+%llu",
				    dev->index, a.id, a.first, a.count);
	kvfree(found);
	wake_up_all(&dev->busy_wait);
	a.done = n;
	return copy_to_user(uarg, &a, sizeof(a)) ? -EFAULT : 0;
}

/* Any request in flight on a block set in bits (block first + i)? */
static bool uloop_inflight_on(struct uloop_dev *dev, const unsigned long *bits, u64 first, u64 count)
{
	struct uloop_cmd *cmd;
	bool on = false;

	spin_lock_irq(&dev->inflight_lock);
	list_for_each_entry(cmd, &dev->inflight, inflight) {
		u64 s = max(cmd->first, first), e = min(cmd->last + 1, first + count);

		if (s < e && find_next_bit(bits, e - first, s - first) < e - first) {
			on = true;
			break;
		}
	}
	spin_unlock_irq(&dev->inflight_lock);
	return on;
}

/* Ends claim `id` with none of its blocks filled: they stay missing and are no longer busy. */
static void uloop_claim_drop(struct uloop_dev *dev, u64 id)
{
	struct uloop_claim *cl;
	u64 i;

	mutex_lock(&dev->lock);
	list_for_each_entry(cl, &dev->claims, node) {
		if (cl->id != id)
			continue;
		for_each_set_bit(i, cl->bits, cl->count)
			ubits_clear(&dev->busy, cl->first + i, cl->first + i + 1);
		dev->nr_claimed -= bitmap_weight(cl->bits, cl->count);
		dev->nr_claims--;
		list_del(&cl->node);
		kvfree(cl);
		dev->busy_seq++;
		break;
	}
	mutex_unlock(&dev->lock);
	wake_up_all(&dev->busy_wait);
}

static int uloop_evict(struct uloop_dev *dev, struct uloop_blocks __user *uarg)
{
	struct uloop_claim *cl = NULL;
	struct uloop_cmd *c, *first;
	struct uloop_blocks a;
	unsigned long *bits;
	u64 i, n = 0;
	bool hold;
	int err;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return uloop_refuse(-EFAULT, "EVICT refused: its argument is not readable");
	err = uloop_blocks_check(dev, "EVICT", &a, dev->nr_blocks, ULOOP_MAX_RANGE_BLOCKS);
	if (err)
		return err;
	if (a.id & ~(ULOOP_EVICT_F_PINNED | ULOOP_EVICT_F_HOLD))
		return uloop_refuse(-EINVAL, "uloop%d: EVICT refused: unknown flags %#llx", dev->index, a.id);
	if (a.id & ULOOP_EVICT_F_HOLD) {
		/* the evicted blocks become a claim: allocated now, listed below */
		cl = kvzalloc(struct_size(cl, bits, BITS_TO_LONGS(a.count)), GFP_KERNEL);
		if (!cl)
			return -ENOMEM;
		cl->first = a.first;
		cl->count = a.count;
	}
	bits = uloop_bits_alloc(a.count);
	if (!bits) {
		kvfree(cl);
		return -ENOMEM;
	}
	if (uloop_bits_in(bits, a.bits_ptr, a.count)) {
		kvfree(bits);
		kvfree(cl);
		return uloop_refuse(-EFAULT, "EVICT refused: the bitmap is not readable");
	}
	mutex_lock(&dev->lock);
	if (cl && dev->nr_claims >= ULOOP_MAX_CLAIMS) {
		mutex_unlock(&dev->lock);
		kvfree(bits);
		kvfree(cl);
		return uloop_refuse(-EAGAIN, "uloop%d: EVICT refused: ULOOP_EVICT_F_HOLD with 64 claims outstanding",
				    dev->index);
	}
	/* the hold's claim slot, taken now: a CLAIM during the wait below cannot leave the evicted
	 * blocks un-held (given back below if nothing is held) */
	if (cl)
		dev->nr_claims++;
	first = list_first_entry_or_null(&dev->preparing, struct uloop_cmd, preparing);
	/* not the blocks of a request between its first and last prepare pass: it may have had
	 * them filled, and would have them filled again. ULOOP_EVICT_F_PINNED (the daemon found
	 * nothing else to free: requests in flight together can hold every clean block between
	 * them, each waiting for room the others hold): only the oldest request keeps its blocks,
	 * so it gets all it needs and ends, and then the next oldest; the others fill again. */
	list_for_each_entry(c, &dev->preparing, preparing) {
		u64 s = max(c->pfirst, a.first), e = min(c->plast + 1, a.first + a.count);

		if ((a.id & ULOOP_EVICT_F_PINNED) && c != first)
			break;
		if (s < e)
			bitmap_clear(bits, s - a.first, e - s);
	}
	for_each_set_bit(i, bits, a.count) {
		u64 b = a.first + i;

		/* the header's rule: present, clean, not busy, not pending (nor handed over or
		 * set aside by a barrier: the store is about to record it present) */
		if (!dev->dead && ubits_test(&dev->present, b) && !ubits_test(&dev->dirty, b) &&
		    !ubits_test(&dev->busy, b) && !ubits_test(&dev->pending, b) &&
		    !ubits_test(&dev->bar_pending, b) && !ubits_test(&dev->lost, b)) {
			ubits_set(&dev->busy, b, b + 1);
			n++;
		} else {
			__clear_bit(i, bits);
		}
	}
	mutex_unlock(&dev->lock);
	/* new requests wait on busy; those already past their last pass finish on their own */
	err = n ? wait_event_killable(dev->inflight_wait, !uloop_inflight_on(dev, bits, a.first, a.count))
		: 0;
	mutex_lock(&dev->lock);
	/* ULOOP_EVICT_F_HOLD: they stay busy, as a claim, until the daemon's FILLED lets them go
	 * after its punch (a write covering one whole would otherwise be written by the kernel
	 * without asking, rule 4, and then punched away); a detach drops the claim */
	hold = cl && !err && n && !dev->dead;
	for_each_set_bit(i, bits, a.count) {
		if (!err)
			dev->nr_present -= ubits_clear(&dev->present, a.first + i, a.first + i + 1);
		if (!hold)
			ubits_clear(&dev->busy, a.first + i, a.first + i + 1);
	}
	a.id = 0;
	if (hold) {
		bitmap_copy(cl->bits, bits, a.count);
		cl->id = a.id = ++dev->next_claim_id;
		dev->nr_claimed += n; /* nr_claims: its slot was taken above */
		list_add_tail(&cl->node, &dev->claims);
		cl = NULL;
	} else if (cl && !dev->dead) { /* dead: REMOVE dropped every claim, the count is 0 */
		dev->nr_claims--;
	}
	dev->busy_seq++;
	mutex_unlock(&dev->lock);
	kvfree(cl);
	wake_up_all(&dev->busy_wait);
	if (err) {
		kvfree(bits);
		return uloop_refuse(-EINTR, "uloop%d: EVICT interrupted; nothing evicted", dev->index);
	}
	a.done = n;
	if (copy_to_user(u64_to_user_ptr(a.bits_ptr), bits, DIV_ROUND_UP(a.count, 8)) ||
	    copy_to_user(uarg, &a, sizeof(a))) {
		err = uloop_refuse(-EFAULT, "EVICT: the bitmap is not writable (%llu blocks were evicted)", n);
		if (a.id) /* the daemon never learns the hold's id: let the blocks go now */
			uloop_claim_drop(dev, a.id);
	}
	kvfree(bits);
	return err;
}

/* Takes the accessed bits of units [s, s + 64) (fewer at the end), clearing them. */
static unsigned long uloop_take_accessed(struct uloop_dev *dev, u64 s, u64 end)
{
	unsigned long v = 0;
	u64 i = s;

	while (i < end && i < s + BITS_PER_LONG) {
		u64 w = i / BITS_PER_LONG;
		unsigned int off = i % BITS_PER_LONG;
		unsigned int take = min_t(u64, min_t(u64, end, s + BITS_PER_LONG) - i,
					  BITS_PER_LONG - off);
		unsigned long mask = (take == BITS_PER_LONG ? ~0UL : ((1UL << take) - 1)) << off;
		unsigned long old = atomic_long_fetch_andnot(mask, (atomic_long_t *)&dev->accessed[w]);

		v |= ((old & mask) >> off) << (i - s);
		i += take;
	}
	return v;
}

static int uloop_accessed(struct uloop_dev *dev, struct uloop_blocks __user *uarg)
{
	struct uloop_blocks a;
	unsigned long *buf;
	u64 i, end, n = 0;
	int err;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return uloop_refuse(-EFAULT, "ACCESSED refused: its argument is not readable");
	if (!dev->accessed)
		return uloop_refuse(-EOPNOTSUPP, "uloop%d: ACCESSED refused: added without ULOOP_F_ACCESSED",
				    dev->index);
	err = uloop_blocks_check(dev, "ACCESSED", &a, dev->nr_units, dev->nr_units);
	if (err)
		return err;
	buf = (unsigned long *)__get_free_page(GFP_KERNEL);
	if (!buf)
		return -ENOMEM;
	end = a.first + a.count;
	/* one page of output at a time: UBITS_PAGE_BITS units */
	for (i = a.first; i < end && !err; i += UBITS_PAGE_BITS) {
		u64 chunk = min_t(u64, end - i, UBITS_PAGE_BITS), j;

		for (j = 0; j < chunk; j += BITS_PER_LONG) {
			buf[j / BITS_PER_LONG] = uloop_take_accessed(dev, i + j, i + chunk);
			n += hweight_long(buf[j / BITS_PER_LONG]);
		}
		if (copy_to_user(u64_to_user_ptr(a.bits_ptr + (i - a.first) / 8), buf,
				 DIV_ROUND_UP(chunk, 8)))
			err = uloop_refuse(-EFAULT, "ACCESSED: the bitmap is not writable (bits were taken)");
		cond_resched();
	}
	free_page((unsigned long)buf);
	a.done = n;
	if (!err && copy_to_user(uarg, &a, sizeof(a)))
		err = -EFAULT;
	return err;
}

static int uloop_epoch_release(struct uloop_dev *dev, struct uloop_blocks __user *uarg)
{
	struct uloop_blocks a;
	int err;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return uloop_refuse(-EFAULT, "EPOCH_RELEASE refused: its argument is not readable");
	if (!(dev->flags & ULOOP_F_PRESERVE))
		return uloop_refuse(-EOPNOTSUPP, "uloop%d: EPOCH_RELEASE refused: added without ULOOP_F_PRESERVE",
				    dev->index);
	err = uloop_blocks_check(dev, "EPOCH_RELEASE", &a, dev->nr_blocks, dev->nr_blocks);
	if (err)
		return err;
	mutex_lock(&dev->lock);
	if (!dev->epoch_open || dev->epoch != a.id)
		err = -ESTALE;
	else
		ubits_set(&dev->done, a.first, a.first + a.count);
	mutex_unlock(&dev->lock);
	if (err)
		return uloop_refuse(err, "uloop%d: EPOCH_RELEASE refused: epoch %llu is not the open one",
				    dev->index, a.id);
	return 0;
}

/*
 * BARRIER (ULOOP_FEAT_BARRIER): the daemon's own barrier, in its own context: no request, so no
 * page cache written back first and no io_timeout; the waits are killable instead (a daemon
 * killed in this call exits, and its fd's release sends what it never answered to the next one).
 */
static int uloop_barrier_ioctl(struct uloop_dev *dev, struct uloop_barrier __user *uarg)
{
	struct uloop_barrier a;
	struct uloop_cmd *cmd;
	u64 taken = 0;
	int err;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return uloop_refuse(-EFAULT, "uloop%d: BARRIER refused: its argument is not readable",
				    dev->index);
	if (a.__pad || a.__reserved[0] || a.__reserved[1])
		return uloop_refuse(-EOPNOTSUPP, "uloop%d: BARRIER refused: reserved fields set",
				    dev->index);
	if (a.flags)
		return uloop_refuse(-EINVAL, "uloop%d: BARRIER refused: unknown flags %#x",
				    dev->index, a.flags);
	cmd = kzalloc(sizeof(*cmd), GFP_KERNEL);
	if (!cmd)
		return -ENOMEM;
	cmd->ioctl = true;
	err = uloop_barrier_run(dev, cmd, &taken);
	kfree(cmd);
	if (err)
		return fatal_signal_pending(current) ? -EINTR : -EIO;
	a.taken = taken;
	return copy_to_user(uarg, &a, sizeof(a)) ?
	       uloop_refuse(-EFAULT, "uloop%d: BARRIER: %llu blocks handed over, but its argument is not writable",
			    dev->index, taken) : 0;
}

/*
 * CREDIT: sets (or lifts) the limit on the blocks written whole while missing without asking;
 * returns the limit and the unasked count. Lowering it below the count is allowed (later writes
 * ask); raising it wakes nobody: a write waits only on a ROOM answer, which the daemon sends.
 */
static int uloop_credit(struct uloop_dev *dev, struct uloop_credit __user *uarg)
{
	struct uloop_credit a;
	u64 want;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return uloop_refuse(-EFAULT, "uloop%d: CREDIT refused: its argument is not readable",
				    dev->index);
	if (a.__pad || a.__reserved[0] || a.__reserved[1])
		return uloop_refuse(-EOPNOTSUPP, "uloop%d: CREDIT refused: reserved fields set",
				    dev->index);
	if (a.flags & ~ULOOP_CREDIT_F_LIMIT)
		return uloop_refuse(-EINVAL, "uloop%d: CREDIT refused: unknown flags %#x",
				    dev->index, a.flags);
	if (!(a.flags & ULOOP_CREDIT_F_LIMIT) && a.limit)
		return uloop_refuse(-EINVAL, "uloop%d: CREDIT refused: a limit (%llu) without ULOOP_CREDIT_F_LIMIT",
				    dev->index, a.limit);
	if ((a.flags & ULOOP_CREDIT_F_LIMIT) && a.limit > dev->nr_blocks)
		return uloop_refuse(-EINVAL, "uloop%d: CREDIT refused: limit %llu is above the device's %llu blocks",
				    dev->index, a.limit, dev->nr_blocks);
	mutex_lock(&dev->lock);
	want = (a.flags & ULOOP_CREDIT_F_LIMIT) ? a.limit : ULOOP_CREDIT_NONE;
	if (want == ULOOP_CREDIT_NONE)
		uloop_rooms_end(dev);
	dev->credit = want;
	a.limit = dev->credit;
	a.unasked = uloop_unasked(dev);
	mutex_unlock(&dev->lock);
	return copy_to_user(uarg, &a, sizeof(a)) ?
	       uloop_refuse(-EFAULT, "uloop%d: CREDIT: the limit is set, but its argument is not writable",
			    dev->index) : 0;
}

static long uloop_dev_ioctl(struct uloop_dev *dev, unsigned int cmd, void __user *uarg)
{
	if (READ_ONCE(dev->dead))
		return uloop_refuse(-ENODEV, "uloop%d was removed: ioctl %#x refused", dev->index, cmd);
	switch (cmd) {
	case ULOOP_IOC_BARRIER_BITS:
		return uloop_barrier_bits(dev, uarg);
	case ULOOP_IOC_EPOCH_BEGIN:
		return uloop_epoch_begin(dev, uarg);
	case ULOOP_IOC_EPOCH_COMMIT:
		return uloop_epoch_commit(dev, uarg);
	case ULOOP_IOC_CLEAR_ERROR:
		return uloop_clear_error(dev, uarg);
	case ULOOP_IOC_CLAIM:
		return uloop_claim(dev, uarg);
	case ULOOP_IOC_FILLED:
		return uloop_filled(dev, uarg);
	case ULOOP_IOC_EVICT:
		return uloop_evict(dev, uarg);
	case ULOOP_IOC_ACCESSED:
		return uloop_accessed(dev, uarg);
	case ULOOP_IOC_EPOCH_RELEASE:
		return uloop_epoch_release(dev, uarg);
	case ULOOP_IOC_CREDIT:
		return uloop_credit(dev, uarg);
	case ULOOP_IOC_BARRIER:
		return uloop_barrier_ioctl(dev, uarg);
	}
	return uloop_refuse(-ENOTTY, "unknown ioctl %#x", cmd);
}

static long uloop_ctl_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct uloop_conn *conn = file->private_data;
	void __user *uarg = (void __user *)arg;
	unsigned int noio;
	long ret;
	u32 index;

	switch (cmd) {
	case ULOOP_IOC_ADD:
		return uloop_add(conn, uarg);
	case ULOOP_IOC_REMOVE:
		if (get_user(index, (u32 __user *)uarg))
			return uloop_refuse(-EFAULT, "REMOVE refused: its argument is not readable");
		return uloop_remove(index);
	case ULOOP_IOC_QUERY:
		return uloop_query(uarg);
	case ULOOP_IOC_ATTACH:
		return uloop_attach(conn, uarg);
	case ULOOP_IOC_GET_FEATURES:
		return uloop_get_features(uarg);
	}
	if (_IOC_TYPE(cmd) != ULOOP_IOC_MAGIC)
		return -ENOTTY; /* not ours (a tty probe): no log line */
	if (!READ_ONCE(conn->dev))
		return uloop_refuse(-ENOTCONN, "ioctl %#x refused: this fd is not attached to a device", cmd);
	/* the daemon's own allocations must not wait for writeback to its device */
	noio = memalloc_noio_save();
	ret = uloop_dev_ioctl(conn->dev, cmd, uarg);
	memalloc_noio_restore(noio);
	return ret;
}

static ssize_t uloop_ctl_read(struct file *file, char __user *buf, size_t count, loff_t *ppos)
{
	struct uloop_conn *conn = file->private_data;
	struct uloop_dev *dev = READ_ONCE(conn->dev);
	struct uloop_msg *msgs;
	size_t n = 0, max = min_t(size_t, count / sizeof(*msgs), ULOOP_MAX_BATCH), i;
	ssize_t ret;

	if (!dev)
		return -ENOTCONN;
	if (!max)
		return -EINVAL;
	/* the daemon's receive path: reclaim must not wait for this device's writeback */
	msgs = kmalloc_array(max, sizeof(*msgs), GFP_NOIO);
	if (!msgs)
		return -ENOMEM;
	for (;;) {
		struct uloop_upcall *up, *tmp;

		mutex_lock(&dev->lock);
		if (dev->dead) {
			mutex_unlock(&dev->lock);
			ret = -ENODEV;
			goto out;
		}
		list_for_each_entry_safe(up, tmp, &dev->queued, node) {
			if (n == max)
				break;
			msgs[n++] = up->msg;
			up->sent = true;
			list_move_tail(&up->node, &dev->sent);
		}
		mutex_unlock(&dev->lock);
		if (n)
			break;
		if (file->f_flags & O_NONBLOCK) {
			ret = -EAGAIN;
			goto out;
		}
		ret = wait_event_interruptible(dev->msg_wait,
					       !list_empty(&dev->queued) || READ_ONCE(dev->dead));
		if (ret)
			goto out;
	}
	if (!copy_to_user(buf, msgs, n * sizeof(*msgs))) {
		ret = n * sizeof(*msgs);
		goto out;
	}
	/* A fault: the daemon never saw these. Back to the head of the queue, in order, if still
	 * outstanding (one may have timed out meanwhile). */
	mutex_lock(&dev->lock);
	for (i = n; i-- > 0;) {
		struct uloop_upcall *up;

		list_for_each_entry(up, &dev->sent, node) {
			if (up->msg.id == msgs[i].id) {
				up->sent = false;
				list_move(&up->node, &dev->queued);
				break;
			}
		}
	}
	mutex_unlock(&dev->lock);
	ret = uloop_refuse(-EFAULT, "uloop%d: read of messages into an unwritable buffer; they stay queued",
			   dev->index);
out:
	kfree(msgs);
	return ret;
}

/* Applies one reply; dev->lock held. 0, or -ENOENT for an id that is not outstanding. */
static int uloop_reply(struct uloop_dev *dev, const struct uloop_reply *r)
{
	struct uloop_upcall *up;
	struct uloop_hold *h;
	unsigned int i;

	list_for_each_entry(up, &dev->sent, node) {
		if (up->msg.id == r->id) {
			/*
			 * Read before uloop_upcall_finish: once completed, `up` may be gone. It lives
			 * on the stack of the uloop_ask() caller, and a ROOM's caller returns without
			 * taking dev->lock: its frame is reused at once, e.g. by the mutex_waiter of
			 * its next mutex_lock(&dev->lock), contended by this very reply. Reading
			 * up->hold afterwards took that waiter's list pointer, &dev->lock.wait_list,
			 * for a hold and list_del()ed it (a valid one-entry list: DEBUG_LIST saw
			 * nothing): LIST_POISON1 in the mutex's wait list, and the GPF at
			 * 0xdead000000000110 in __mutex_unlock_slowpath (review11 F-1).
			 */
			struct uloop_hold *hold = up->hold;

			up->answered = true;
			if (up->msg.type == ULOOP_MSG_ROOM && !r->error && up->cmd) {
				/* the grant (the missing count asked), replacing the request's unused
				 * one (uloop_ask_room); the limit goes up by as much in the same step.
				 * A daemon raising it first (the old protocol) let other writes take
				 * that room before the grant was counted, and the grant was then taken
				 * over the limit as well: the cache file passed a 16 MiB budget by 4-5
				 * MiB under a buffered writer (review8 K1's load). */
				u64 g = up->msg.epoch, more = g - up->cmd->room;

				dev->nr_granted += more;
				up->cmd->room = g;
				if (dev->credit != ULOOP_CREDIT_NONE)
					dev->credit = min(dev->credit + more, dev->nr_blocks);
			}
			uloop_upcall_finish(up, r->error); /* `up` is not touched after this */
			if (hold) /* re-issued: nobody waits for it (up is the hold's, freed here) */
				uloop_hold_answered(dev, hold, r->error);
			return 0;
		}
	}
	list_for_each_entry(h, &dev->holds, node) {
		if (r->id && h->id == r->id) { /* the late work is done */
			uloop_hold_answered(dev, h, r->error);
			atomic64_inc(&dev->stats.late_replies);
			return 0;
		}
	}
	for (i = 0; i < ULOOP_EXPIRED_IDS; i++) {
		if (r->id && dev->expired[i] == r->id) {
			dev->expired[i] = 0;
			atomic64_inc(&dev->stats.late_replies);
			return 0;
		}
	}
	return -ENOENT;
}

static ssize_t uloop_ctl_write(struct file *file, const char __user *buf, size_t count,
			       loff_t *ppos)
{
	struct uloop_conn *conn = file->private_data;
	struct uloop_dev *dev = READ_ONCE(conn->dev);
	size_t i, n = count / sizeof(struct uloop_reply);
	int err = 0;

	if (!dev)
		return -ENOTCONN;
	if (!n || count % sizeof(struct uloop_reply))
		return uloop_refuse(-EINVAL, "uloop%d: a write of %zu bytes is not whole replies of %zu",
				    dev->index, count, sizeof(struct uloop_reply));
	for (i = 0; i < n; i++) {
		struct uloop_reply r;

		if (copy_from_user(&r, buf + i * sizeof(r), sizeof(r))) {
			err = -EFAULT;
			break;
		}
		if (r.error > 0 || r.error < -MAX_ERRNO) {
			err = uloop_refuse(-EINVAL, "uloop%d: reply %llu with error %d, not 0 or a negative errno",
					   dev->index, r.id, r.error);
			break;
		}
		if (r.error == -ETIMEDOUT) /* that errno means "io_timeout_s passed" here */
			r.error = -EIO;
		mutex_lock(&dev->lock);
		err = dev->dead ? -ENODEV : uloop_reply(dev, &r);
		mutex_unlock(&dev->lock);
		if (err == -ENOENT)
			uloop_refuse(err, "uloop%d: reply to %llu, which is not an outstanding message",
				     dev->index, r.id);
		if (err)
			break;
	}
	return i ? i * sizeof(struct uloop_reply) : err;
}

static __poll_t uloop_ctl_poll(struct file *file, poll_table *wait)
{
	struct uloop_conn *conn = file->private_data;
	struct uloop_dev *dev = READ_ONCE(conn->dev);
	__poll_t mask = EPOLLOUT | EPOLLWRNORM;

	if (!dev)
		return EPOLLERR;
	poll_wait(file, &dev->msg_wait, wait);
	if (!list_empty(&dev->queued))
		mask |= EPOLLIN | EPOLLRDNORM;
	if (READ_ONCE(dev->dead))
		mask |= EPOLLHUP;
	return mask;
}

static int uloop_ctl_open(struct inode *inode, struct file *file)
{
	struct uloop_conn *conn = kzalloc(sizeof(*conn), GFP_KERNEL);

	if (!conn)
		return -ENOMEM;
	mutex_init(&conn->lock);
	file->private_data = conn;
	return stream_open(inode, file);
}

/* The daemon went away: its unanswered messages go back to the queue for the next one. */
static int uloop_ctl_release(struct inode *inode, struct file *file)
{
	struct uloop_conn *conn = file->private_data;
	struct uloop_dev *dev = conn->dev;
	struct uloop_upcall *up;

	if (dev) {
		mutex_lock(&dev->lock);
		if (dev->daemon == conn) {
			dev->daemon = NULL;
			dev->detached_at = jiffies;
			list_for_each_entry(up, &dev->sent, node)
				up->sent = false;
			list_splice_init(&dev->sent, &dev->queued);
			uloop_drop_claims(dev);
			uloop_holds_detach(dev); /* no late fill can come from it now */
		}
		mutex_unlock(&dev->lock);
		wake_up_all(&dev->busy_wait);
		kref_put(&dev->kref, uloop_free);
	}
	kfree(conn);
	return 0;
}

static const struct file_operations uloop_ctl_fops = {
	.owner = THIS_MODULE,
	.open = uloop_ctl_open,
	.release = uloop_ctl_release,
	.read = uloop_ctl_read,
	.write = uloop_ctl_write,
	.poll = uloop_ctl_poll,
	.unlocked_ioctl = uloop_ctl_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 12, 0)
	.llseek = no_llseek, /* 6.12 removed no_llseek: a NULL .llseek now means "not seekable" */
#endif
};

static struct miscdevice uloop_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = ULOOP_CONTROL_NAME,
	.fops = &uloop_ctl_fops,
	.mode = 0600,
};

static int __init uloop_init(void)
{
	int err = -ENOMEM;

	part_shift = max_part ? fls(max_part) : 0;
	if (part_shift > MINORBITS - 4) {
		pr_err("uloop: max_part=%u leaves fewer than 16 devices\n", max_part);
		return -EINVAL;
	}
	uloop_zeros = (unsigned long *)get_zeroed_page(GFP_KERNEL);
	uloop_ones = (unsigned long *)__get_free_page(GFP_KERNEL);
	if (!uloop_zeros || !uloop_ones)
		goto out_pages;
	memset(uloop_ones, 0xff, PAGE_SIZE);
	uloop_major = register_blkdev(0, "uloop");
	if (uloop_major < 0) {
		err = uloop_major;
		goto out_pages;
	}
	err = misc_register(&uloop_misc);
	if (err)
		goto out_blkdev;
	return 0;

out_blkdev:
	unregister_blkdev(uloop_major, "uloop");
out_pages:
	free_page((unsigned long)uloop_zeros);
	free_page((unsigned long)uloop_ones);
	return err;
}

/* Runs only with no devices left: each one pins the module. */
static void __exit uloop_exit(void)
{
	misc_deregister(&uloop_misc);
	unregister_blkdev(uloop_major, "uloop");
	idr_destroy(&uloop_idr);
	free_page((unsigned long)uloop_zeros);
	free_page((unsigned long)uloop_ones);
}

module_init(uloop_init);
module_exit(uloop_exit);
MODULE_DESCRIPTION("uloop: block device over a cache file, with misses and barriers in userspace");
MODULE_LICENSE("GPL");
