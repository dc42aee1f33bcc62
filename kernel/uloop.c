// SPDX-License-Identifier: GPL-2.0-only
/*
 * uloop: a block device over a cache file, for ulobdev. Hits (present blocks) are served here from
 * the cache file; misses, dirty intents and flush barriers go to a userspace daemon over a
 * poll()-able fd. Mechanism only: the daemon decides where data comes from and what is persisted.
 * The ABI is include/uapi/uloop.h; the protocol is described there and in docs/design.md.
 *
 * Objects and lifetimes:
 *  - struct uloop_dev: created by ULOOP_IOC_ADD, torn down (disk, queue, workqueue, cache file) by
 *    ULOOP_IOC_REMOVE in the reverse order; its memory is refcounted (kref): the idr holds one
 *    reference, an attached daemon fd another; the last put frees the bitmaps and the struct.
 *    Each device pins the module (__module_get on ADD, module_put on REMOVE), so rmmod with
 *    devices present is refused with EBUSY.
 *  - struct uloop_rq: blk-mq's per-request pdu; owned by blk-mq, valid from queue_rq to
 *    blk_mq_end_request. queue_rq puts it on dev->rq_list; the device's one rq_work drains that
 *    list, serving what needs no daemon inline and giving each other request its own work item
 *    (pdu->work). Its bvec array (only for requests of several bios; a one-bio request uses the
 *    bio's) is allocated before the cache-file I/O and freed on its completion.
 *  - struct uloop_cmd: a message to the daemon, on the stack of the work item waiting for it. It is
 *    on dev->queued (not read yet) or dev->sent (read, not answered) while `listed`; whoever takes
 *    it off the list (a reply, the timeout, device removal) sets its error and completes it.
 *  - struct uloop_conn: file->private_data of an open /dev/uloop-control; freed on release.
 */
#include <linux/bitmap.h>
#include <linux/blk-mq.h>
#include <linux/blkdev.h>
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
#include <linux/wait.h>
#include <linux/workqueue.h>

#include "uapi/uloop.h"

#if defined(__BIG_ENDIAN)
#error "uloop: the bitmap ABI (LSB-first bytes) is copied word-wise, which assumes little-endian"
#endif

static unsigned int reattach_timeout_s = 30;
module_param(reattach_timeout_s, uint, 0644);
MODULE_PARM_DESC(reattach_timeout_s, "seconds requests wait for a daemon to re-attach before failing with EIO");

#define ULOOP_MAX_BATCH 64 /* messages per read() */

static int uloop_major;
static DEFINE_IDR(uloop_idr);
static DEFINE_MUTEX(uloop_ctl_mutex); /* the idr, ADD, REMOVE, ATTACH */

struct uloop_conn;

struct uloop_dev {
	struct kref kref;
	int index;
	struct file *cache;
	u64 size;
	u32 block_size;
	u32 block_shift;
	u32 flags;
	u64 nr_blocks;

	spinlock_t lock; /* everything below up to the disk; taken from completions, so irqsave */
	unsigned long *present;
	unsigned long *dirty;
	unsigned long *busy;        /* a miss, intent or first write owns the block */
	unsigned long *new_present; /* set since the last barrier, not yet known to the daemon */
	unsigned long *new_dirty;
	unsigned long *rewritten;   /* written since EPOCH_BEGIN */
	wait_queue_head_t busy_wait;
	struct list_head inflight;  /* uloop_rq of writes between prepare and completion */
	u64 epoch;
	bool epoch_open;
	bool dead;                  /* REMOVE has begun */
	struct uloop_conn *daemon;  /* NULL while detached */
	unsigned long detached_at;  /* jiffies */
	struct list_head queued, sent;
	wait_queue_head_t msg_wait;
	u64 next_id;

	struct mutex barrier_mutex; /* one FLUSH barrier at a time, in order */

	struct blk_mq_tag_set tag_set;
	struct gendisk *disk;
	struct workqueue_struct *wq;
	spinlock_t rq_lock;         /* rq_list */
	struct list_head rq_list;   /* uloop_rq from queue_rq, not yet taken by rq_work */
	struct work_struct rq_work; /* drains rq_list; empty once del_gendisk has returned */
};

struct uloop_conn {
	struct uloop_dev *dev; /* holds a reference while attached */
};

struct uloop_rq {
	struct list_head queue;    /* on dev->rq_list between queue_rq and rq_work */
	struct work_struct work;   /* requests that may wait (daemon, busy blocks), FLUSH, FUA */
	struct kiocb iocb;
	struct bio_vec *bvec;
	atomic_t ref;              /* the submitter and the I/O completion; the last ends it */
	long ret;
	struct list_head inflight;
	u64 first, last; /* blocks touched, inclusive */
	bool write, owns_missing;
};

struct uloop_cmd {
	struct list_head node;
	struct uloop_msg msg;
	struct completion done;
	int error;
	bool listed;
	unsigned long *bar_present, *bar_dirty; /* barrier only */
};

static size_t uloop_bitmap_bytes(u64 nr_blocks)
{
	return BITS_TO_LONGS(nr_blocks) * sizeof(long);
}

static void uloop_free(struct kref *kref)
{
	struct uloop_dev *dev = container_of(kref, struct uloop_dev, kref);

	kvfree(dev->present);
	kvfree(dev->dirty);
	kvfree(dev->busy);
	kvfree(dev->new_present);
	kvfree(dev->new_dirty);
	kvfree(dev->rewritten);
	kfree(dev);
}

/* ---- the daemon channel ---------------------------------------------------------------------- */

/* Takes a listed command off its list and completes it. Called with dev->lock held. */
static void uloop_cmd_finish(struct uloop_cmd *c, int error)
{
	list_del(&c->node);
	c->listed = false;
	c->error = error;
	complete(&c->done);
}

/*
 * Hands a message to the daemon and waits for its answer. While no daemon is attached the wait is
 * bounded by reattach_timeout_s, counted from the detach; a re-attached daemon gets the message
 * again. Process context only.
 */
static int uloop_ask(struct uloop_dev *dev, struct uloop_cmd *c, u32 type, u64 offset, u64 length)
{
	unsigned long flags;

	init_completion(&c->done);
	c->msg.type = type;
	c->msg.offset = offset;
	c->msg.length = length;
	spin_lock_irqsave(&dev->lock, flags);
	if (dev->dead) {
		spin_unlock_irqrestore(&dev->lock, flags);
		return -EIO;
	}
	c->msg.id = ++dev->next_id;
	list_add_tail(&c->node, &dev->queued);
	c->listed = true;
	spin_unlock_irqrestore(&dev->lock, flags);
	wake_up_interruptible(&dev->msg_wait);

	while (!wait_for_completion_timeout(&c->done, HZ)) {
		bool expired;

		spin_lock_irqsave(&dev->lock, flags);
		expired = !dev->daemon &&
			  time_after(jiffies, dev->detached_at + reattach_timeout_s * HZ);
		if (expired && c->listed) {
			uloop_cmd_finish(c, -EIO);
			pr_warn_ratelimited("uloop%d: no daemon for %us, failing request\n",
					    dev->index, reattach_timeout_s);
		}
		spin_unlock_irqrestore(&dev->lock, flags);
	}
	return c->error;
}

/* Fails every outstanding message (device removal). Called with dev->lock held. */
static void uloop_fail_all(struct uloop_dev *dev)
{
	struct uloop_cmd *c, *n;

	list_for_each_entry_safe(c, n, &dev->queued, node)
		uloop_cmd_finish(c, -EIO);
	list_for_each_entry_safe(c, n, &dev->sent, node)
		uloop_cmd_finish(c, -EIO);
}

/* ---- the data path --------------------------------------------------------------------------- */

static bool uloop_range_busy(struct uloop_dev *dev, u64 first, u64 last)
{
	unsigned long flags;
	bool busy;

	spin_lock_irqsave(&dev->lock, flags);
	busy = find_next_bit(dev->busy, last + 1, first) <= last;
	spin_unlock_irqrestore(&dev->lock, flags);
	return busy;
}

/* Asks the daemon about blocks [b, e) marked busy by the caller; on success sets `set` bits. */
static int uloop_ask_blocks(struct uloop_dev *dev, u32 type, u64 b, u64 e)
{
	struct uloop_cmd c = {};
	unsigned long flags;
	u64 off = b << dev->block_shift;
	u64 len = min_t(u64, e << dev->block_shift, dev->size) - off;
	int err;

	err = uloop_ask(dev, &c, type, off, len);
	spin_lock_irqsave(&dev->lock, flags);
	if (!err) {
		bitmap_set(dev->present, b, e - b);
		if (type == ULOOP_MSG_INTENT)
			bitmap_set(dev->dirty, b, e - b);
	}
	bitmap_clear(dev->busy, b, e - b);
	spin_unlock_irqrestore(&dev->lock, flags);
	wake_up_all(&dev->busy_wait);
	if (err)
		pr_warn_ratelimited("uloop%d: daemon failed %s at %llu+%llu: %d\n", dev->index,
				    type == ULOOP_MSG_MISS ? "miss" : "intent", off, len, err);
	return err;
}

/*
 * Makes a read or write of [pos, pos + len) servable from the cache file: fills missing blocks via
 * the daemon (reads; partly written blocks, rule 5), persists dirty intents of clean blocks about to
 * be overwritten (rule 3), takes missing blocks a write covers whole (rule 4) as busy for the
 * write's lifetime, and registers a write as in flight for the epoch rules. Loops until one pass
 * finds nothing to do, with dev->lock held at that point. With `nowait` (rq_work, which must not
 * block the requests behind it) only one pass runs: if it finds busy blocks or something to ask
 * the daemon it returns -EAGAIN having changed nothing, and the request goes to its own work item.
 */
static int uloop_prepare(struct uloop_dev *dev, struct uloop_rq *pdu, u64 pos, u64 len,
			 bool nowait)
{
	u64 first = pos >> dev->block_shift, last = (pos + len - 1) >> dev->block_shift;
	u64 end = pos + len;

	pdu->first = first;
	pdu->last = last;
	pdu->owns_missing = false;
	for (;;) {
		unsigned long flags;
		u64 b, e;
		u32 type;

		if (!nowait)
			wait_event(dev->busy_wait, !uloop_range_busy(dev, first, last));
		spin_lock_irqsave(&dev->lock, flags);
		if (find_next_bit(dev->busy, last + 1, first) <= last) {
			spin_unlock_irqrestore(&dev->lock, flags);
			if (nowait)
				return -EAGAIN;
			continue;
		}
		type = 0;
		if (!pdu->write) {
			b = find_next_zero_bit(dev->present, last + 1, first);
			if (b <= last) {
				e = find_next_bit(dev->present, last + 1, b);
				type = ULOOP_MSG_MISS;
			}
		} else {
			u64 edges[2] = { first, last };
			int i;

			for (i = 0; i < 2 && !type; i++) {
				u64 bs = edges[i] << dev->block_shift;
				u64 be = min_t(u64, bs + dev->block_size, dev->size);

				if (!test_bit(edges[i], dev->present) && (bs < pos || be > end)) {
					b = edges[i];
					e = b + 1;
					type = ULOOP_MSG_MISS;
				}
			}
			for (b = first; !type && b <= last; b++) {
				if (test_bit(b, dev->present) && !test_bit(b, dev->dirty)) {
					for (e = b + 1; e <= last && test_bit(e, dev->present) &&
							!test_bit(e, dev->dirty); e++)
						;
					type = ULOOP_MSG_INTENT;
					break;
				}
			}
		}
		if (type && nowait) {
			spin_unlock_irqrestore(&dev->lock, flags);
			return -EAGAIN;
		}
		if (type) {
			bitmap_set(dev->busy, b, e - b);
			spin_unlock_irqrestore(&dev->lock, flags);
			if (uloop_ask_blocks(dev, type, b, e))
				return -EIO;
			continue;
		}
		if (pdu->write) {
			/* Whatever is still missing is covered whole: ours until the write completes. */
			for (b = find_next_zero_bit(dev->present, last + 1, first); b <= last;
			     b = find_next_zero_bit(dev->present, last + 1, b + 1)) {
				__set_bit(b, dev->busy);
				pdu->owns_missing = true;
			}
			if (dev->epoch_open)
				bitmap_set(dev->rewritten, first, last - first + 1);
			list_add_tail(&pdu->inflight, &dev->inflight);
		}
		spin_unlock_irqrestore(&dev->lock, flags);
		return 0;
	}
}

static int uloop_flush(struct uloop_dev *dev);

static void uloop_fua_work(struct work_struct *work)
{
	struct uloop_rq *pdu = container_of(work, struct uloop_rq, work);

	blk_mq_end_request(blk_mq_rq_from_pdu(pdu), errno_to_blk_status(uloop_flush(
		blk_mq_rq_from_pdu(pdu)->q->queuedata)));
}

/*
 * Ends the cache-file I/O of a request once both the submitter has returned from read_iter or
 * write_iter and the I/O has completed (as loop's lo_rw_aio: the iov_iter may point into the bio's
 * bvec array, which must outlive the submitter's use of it). Any context.
 */
static void uloop_rw_put(struct uloop_rq *pdu)
{
	struct request *rq = blk_mq_rq_from_pdu(pdu);
	struct uloop_dev *dev = rq->q->queuedata;
	unsigned long len = blk_rq_bytes(rq);
	long ret;
	int err = 0;

	if (!atomic_dec_and_test(&pdu->ref))
		return;
	ret = pdu->ret;
	kfree(pdu->bvec);
	pdu->bvec = NULL;
	if (ret < 0) {
		err = ret;
	} else if ((unsigned long)ret < len) {
		err = -EIO; /* the cache file shrank under us (ADD checked its size) */
	}
	if (pdu->write) {
		unsigned long flags;
		u64 b;

		spin_lock_irqsave(&dev->lock, flags);
		list_del(&pdu->inflight);
		if (pdu->owns_missing) {
			for (b = pdu->first; b <= pdu->last; b++) {
				if (!test_bit(b, dev->busy) || test_bit(b, dev->present))
					continue;
				__clear_bit(b, dev->busy);
				if (err)
					continue;
				/* rule 4: present and dirty now, reported at the next barrier */
				__set_bit(b, dev->present);
				__set_bit(b, dev->dirty);
				__set_bit(b, dev->new_present);
				__set_bit(b, dev->new_dirty);
			}
		}
		spin_unlock_irqrestore(&dev->lock, flags);
		if (pdu->owns_missing)
			wake_up_all(&dev->busy_wait);
	}
	if (err)
		pr_warn_ratelimited("uloop%d: cache file %s failed: %d\n", dev->index,
				    pdu->write ? "write" : "read", err);
	if (!err && pdu->write && (rq->cmd_flags & REQ_FUA)) {
		INIT_WORK(&pdu->work, uloop_fua_work);
		queue_work(dev->wq, &pdu->work);
		return;
	}
	blk_mq_end_request(rq, errno_to_blk_status(err));
}

/* Completion of the cache-file I/O; any context (direct I/O completes in interrupts). */
static void uloop_rw_done(struct kiocb *iocb, long ret)
{
	struct uloop_rq *pdu = container_of(iocb, struct uloop_rq, iocb);

	pdu->ret = ret;
	uloop_rw_put(pdu);
}

/* The cache-file I/O of one request: a kiocb over a bvec iov_iter, as loop's lo_rw_aio. */
static void uloop_rw(struct uloop_dev *dev, struct uloop_rq *pdu, struct request *rq, u64 pos)
{
	struct file *file = dev->cache;
	struct req_iterator it;
	struct bio_vec bv, *copy;
	const struct bio_vec *bvec; /* 7.x's __bvec_iter_bvec() returns const (a macro in 6.12) */
	struct iov_iter iter;
	unsigned int nr = 0, offset = 0;
	ssize_t ret;

	atomic_set(&pdu->ref, 2);
	pdu->bvec = NULL;
	rq_for_each_bvec(bv, rq, it)
		nr++;
	if (rq->bio != rq->biotail) {
		copy = kmalloc_array(nr, sizeof(*copy), GFP_NOIO);
		if (!copy) {
			pdu->ret = -ENOMEM;
			atomic_set(&pdu->ref, 1);
			uloop_rw_put(pdu);
			return;
		}
		pdu->bvec = copy;
		nr = 0;
		rq_for_each_bvec(bv, rq, it)
			copy[nr++] = bv;
		bvec = copy;
	} else {
		/* one bio: its own bvec array, from where the bio's iterator stands */
		bvec = __bvec_iter_bvec(rq->bio->bi_io_vec, rq->bio->bi_iter);
#if LINUX_VERSION_CODE >= KERNEL_VERSION(7, 3, 0)
		offset = rq->bio->bi_iter.bi_offset; /* bvec_iter.bi_bvec_done was renamed in 7.3 */
#else
		offset = rq->bio->bi_iter.bi_bvec_done;
#endif
	}
	iov_iter_bvec(&iter, pdu->write ? WRITE : READ, bvec, nr, blk_rq_bytes(rq));
	iter.iov_offset = offset;

	pdu->iocb.ki_pos = pos;
	pdu->iocb.ki_filp = file;
	pdu->iocb.ki_complete = uloop_rw_done;
	pdu->iocb.ki_flags = (file->f_flags & O_DIRECT) ? IOCB_DIRECT : 0;
	pdu->iocb.ki_ioprio = req_get_ioprio(rq);
	if (pdu->write) {
		file_start_write(file);
		ret = file->f_op->write_iter(&pdu->iocb, &iter);
		file_end_write(file);
	} else {
		ret = file->f_op->read_iter(&pdu->iocb, &iter);
	}
	if (ret != -EIOCBQUEUED)
		uloop_rw_done(&pdu->iocb, ret);
	uloop_rw_put(pdu);
}

/*
 * FLUSH: sync the cache file, then hand the daemon the present/dirty bits set since the previous
 * barrier and wait until it has persisted them (invariant 3). With no new bits there is nothing for
 * the daemon to persist and no message. On failure the bits are put back for the next barrier.
 */
static int uloop_flush(struct uloop_dev *dev)
{
	size_t bytes = uloop_bitmap_bytes(dev->nr_blocks);
	struct uloop_cmd c = {};
	unsigned long flags;
	unsigned int noio;
	bool any;
	int err;

	mutex_lock(&dev->barrier_mutex);
	err = vfs_fsync(dev->cache, 0);
	if (err) {
		pr_warn_ratelimited("uloop%d: fsync of the cache file failed: %d\n", dev->index, err);
		goto out;
	}
	noio = memalloc_noio_save();
	c.bar_present = kvzalloc(bytes, GFP_KERNEL);
	c.bar_dirty = kvzalloc(bytes, GFP_KERNEL);
	memalloc_noio_restore(noio);
	if (!c.bar_present || !c.bar_dirty) {
		err = -ENOMEM;
		goto out_free;
	}
	spin_lock_irqsave(&dev->lock, flags);
	any = !bitmap_empty(dev->new_present, dev->nr_blocks);
	if (any) {
		bitmap_copy(c.bar_present, dev->new_present, dev->nr_blocks);
		bitmap_copy(c.bar_dirty, dev->new_dirty, dev->nr_blocks);
		bitmap_zero(dev->new_present, dev->nr_blocks);
		bitmap_zero(dev->new_dirty, dev->nr_blocks);
	}
	spin_unlock_irqrestore(&dev->lock, flags);
	if (!any)
		goto out_free;
	err = uloop_ask(dev, &c, ULOOP_MSG_BARRIER, 0, DIV_ROUND_UP(dev->nr_blocks, 8));
	if (err) {
		spin_lock_irqsave(&dev->lock, flags);
		bitmap_or(dev->new_present, dev->new_present, c.bar_present, dev->nr_blocks);
		bitmap_or(dev->new_dirty, dev->new_dirty, c.bar_dirty, dev->nr_blocks);
		spin_unlock_irqrestore(&dev->lock, flags);
		pr_warn_ratelimited("uloop%d: barrier failed: %d\n", dev->index, err);
	}
out_free:
	kvfree(c.bar_present);
	kvfree(c.bar_dirty);
out:
	mutex_unlock(&dev->barrier_mutex);
	return err;
}

/* A request that may sleep on the daemon, on busy blocks or on a barrier: its own work item. */
static void uloop_work(struct work_struct *work)
{
	struct uloop_rq *pdu = container_of(work, struct uloop_rq, work);
	struct request *rq = blk_mq_rq_from_pdu(pdu);
	struct uloop_dev *dev = rq->q->queuedata;
	u64 pos = (u64)blk_rq_pos(rq) << SECTOR_SHIFT;
	unsigned int noio;
	int err;

	switch (req_op(rq)) {
	case REQ_OP_FLUSH:
		blk_mq_end_request(rq, errno_to_blk_status(uloop_flush(dev)));
		return;
	case REQ_OP_READ:
	case REQ_OP_WRITE:
		pdu->write = req_op(rq) == REQ_OP_WRITE;
		if (pdu->write && !(dev->flags & ULOOP_F_WRITEBACK)) {
			blk_mq_end_request(rq, BLK_STS_IOERR);
			return;
		}
		err = uloop_prepare(dev, pdu, pos, blk_rq_bytes(rq), false);
		if (err) {
			blk_mq_end_request(rq, errno_to_blk_status(err));
			return;
		}
		noio = memalloc_noio_save();
		uloop_rw(dev, pdu, rq, pos);
		memalloc_noio_restore(noio);
		return;
	default:
		blk_mq_end_request(rq, BLK_STS_NOTSUPP);
	}
}

/*
 * The hit path: a read or write whose blocks are present, not busy and (writes) dirty or missing
 * and covered whole needs no daemon; its cache-file I/O is issued here, in rq_work. Anything else
 * gets its own work item, so that a request waiting for the daemon never holds up the others.
 */
static void uloop_dispatch(struct uloop_dev *dev, struct uloop_rq *pdu)
{
	struct request *rq = blk_mq_rq_from_pdu(pdu);
	u64 pos = (u64)blk_rq_pos(rq) << SECTOR_SHIFT;

	if (req_op(rq) == REQ_OP_READ ||
	    (req_op(rq) == REQ_OP_WRITE && (dev->flags & ULOOP_F_WRITEBACK))) {
		pdu->write = req_op(rq) == REQ_OP_WRITE;
		if (!uloop_prepare(dev, pdu, pos, blk_rq_bytes(rq), true)) {
			uloop_rw(dev, pdu, rq, pos);
			return;
		}
	}
	INIT_WORK(&pdu->work, uloop_work);
	queue_work(dev->wq, &pdu->work);
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
			struct uloop_rq *pdu = list_first_entry(&list, struct uloop_rq, queue);

			list_del_init(&pdu->queue);
			uloop_dispatch(dev, pdu);
		}
	}
	memalloc_noio_restore(noio);
}

/* Never sleeps: the request goes to process context, where the file I/O and any wait runs. */
static blk_status_t uloop_queue_rq(struct blk_mq_hw_ctx *hctx, const struct blk_mq_queue_data *bd)
{
	struct request *rq = bd->rq;
	struct uloop_rq *pdu = blk_mq_rq_to_pdu(rq);
	struct uloop_dev *dev = rq->q->queuedata;
	unsigned long flags;

	blk_mq_start_request(rq);
	spin_lock_irqsave(&dev->rq_lock, flags);
	list_add_tail(&pdu->queue, &dev->rq_list);
	spin_unlock_irqrestore(&dev->rq_lock, flags);
	queue_work(dev->wq, &dev->rq_work); /* a no-op while it is pending */
	return BLK_STS_OK;
}

static const struct blk_mq_ops uloop_mq_ops = {
	.queue_rq = uloop_queue_rq,
};

static const struct block_device_operations uloop_fops = {
	.owner = THIS_MODULE,
};

/* ---- ADD / REMOVE ---------------------------------------------------------------------------- */

static int uloop_load_bitmap(unsigned long *bits, u64 ptr, u64 nr_blocks)
{
	if (copy_from_user(bits, u64_to_user_ptr(ptr), DIV_ROUND_UP(nr_blocks, 8)))
		return -EFAULT;
	/* bits past the end would be counted by bitmap_weight and found by the scans */
	if (nr_blocks % BITS_PER_LONG)
		bits[nr_blocks / BITS_PER_LONG] &= BITMAP_LAST_WORD_MASK(nr_blocks);
	return 0;
}

static int uloop_add(struct uloop_conn *conn, struct uloop_add __user *uarg)
{
	struct uloop_add a;
	struct uloop_dev *dev;
	struct gendisk *disk;
	struct file *file;
	size_t bytes;
	int err;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	if (a.version != ULOOP_ABI_VERSION)
		return -EPROTO;
	if (!a.size || a.size % SECTOR_SIZE || !is_power_of_2(a.block_size) ||
	    a.block_size < 4096 || a.block_size > (1U << 20) || (a.flags & ~ULOOP_F_WRITEBACK))
		return -EINVAL;
	if (conn->dev)
		return -EBUSY;
	file = fget(a.cache_fd);
	if (!file)
		return -EBADF;
	err = -EINVAL;
	if (!S_ISREG(file_inode(file)->i_mode) || !(file->f_mode & FMODE_READ) ||
	    !file->f_op->read_iter || !file->f_op->write_iter)
		goto out_fput;
	if ((a.flags & ULOOP_F_WRITEBACK) && !(file->f_mode & FMODE_WRITE))
		goto out_fput;
	if (i_size_read(file_inode(file)) < a.size)
		goto out_fput;

	err = -ENOMEM;
	dev = kzalloc(sizeof(*dev), GFP_KERNEL);
	if (!dev)
		goto out_fput;
	kref_init(&dev->kref);
	spin_lock_init(&dev->lock);
	init_waitqueue_head(&dev->busy_wait);
	init_waitqueue_head(&dev->msg_wait);
	INIT_LIST_HEAD(&dev->inflight);
	INIT_LIST_HEAD(&dev->queued);
	INIT_LIST_HEAD(&dev->sent);
	mutex_init(&dev->barrier_mutex);
	spin_lock_init(&dev->rq_lock);
	INIT_LIST_HEAD(&dev->rq_list);
	INIT_WORK(&dev->rq_work, uloop_rq_work);
	dev->size = a.size;
	dev->block_size = a.block_size;
	dev->block_shift = ilog2(a.block_size);
	dev->flags = a.flags;
	dev->nr_blocks = DIV_ROUND_UP(a.size, a.block_size);
	bytes = uloop_bitmap_bytes(dev->nr_blocks);
	dev->present = kvzalloc(bytes, GFP_KERNEL);
	dev->dirty = kvzalloc(bytes, GFP_KERNEL);
	dev->busy = kvzalloc(bytes, GFP_KERNEL);
	dev->new_present = kvzalloc(bytes, GFP_KERNEL);
	dev->new_dirty = kvzalloc(bytes, GFP_KERNEL);
	dev->rewritten = kvzalloc(bytes, GFP_KERNEL);
	if (!dev->present || !dev->dirty || !dev->busy || !dev->new_present || !dev->new_dirty ||
	    !dev->rewritten)
		goto out_free;
	err = uloop_load_bitmap(dev->present, a.present_ptr, dev->nr_blocks);
	if (!err)
		err = uloop_load_bitmap(dev->dirty, a.dirty_ptr, dev->nr_blocks);
	if (err)
		goto out_free;
	bitmap_or(dev->present, dev->present, dev->dirty, dev->nr_blocks);

	mutex_lock(&uloop_ctl_mutex);
	if (a.index == ULOOP_INDEX_ANY)
		err = idr_alloc(&uloop_idr, dev, 0, 1 << MINORBITS, GFP_KERNEL);
	else if (a.index < (1U << MINORBITS))
		err = idr_alloc(&uloop_idr, dev, a.index, a.index + 1, GFP_KERNEL);
	else
		err = -EINVAL;
	mutex_unlock(&uloop_ctl_mutex);
	if (err < 0)
		goto out_free; /* -ENOSPC: that N is taken */
	dev->index = err;

	err = -ENOMEM;
	dev->wq = alloc_workqueue("uloop%d", WQ_MEM_RECLAIM | WQ_UNBOUND, 0, dev->index);
	if (!dev->wq)
		goto out_idr;

	dev->tag_set.ops = &uloop_mq_ops;
	dev->tag_set.nr_hw_queues = 1;
	dev->tag_set.queue_depth = 128;
	dev->tag_set.numa_node = NUMA_NO_NODE;
	dev->tag_set.cmd_size = sizeof(struct uloop_rq);
	/* no I/O scheduler by default, as loop: the cache file's own path does the ordering */
	dev->tag_set.flags = BLK_MQ_F_NO_SCHED_BY_DEFAULT;
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 14, 0)
	dev->tag_set.flags |= BLK_MQ_F_SHOULD_MERGE; /* 6.14 made merging the default, removed the flag */
#endif
	dev->tag_set.driver_data = dev;
	err = blk_mq_alloc_tag_set(&dev->tag_set);
	if (err)
		goto out_wq;

#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 9, 0)
	/* 6.9: blk_mq_alloc_disk() takes the queue_limits */
	{
		struct queue_limits lim = {
			.logical_block_size = SECTOR_SIZE,
			.physical_block_size = min_t(u32, a.block_size, PAGE_SIZE),
			.io_min = a.block_size,
			.max_hw_sectors = 2048,
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 11, 0)
			/* 6.11: the volatile cache and FUA became queue_limits.features */
			.features = BLK_FEAT_WRITE_CACHE | BLK_FEAT_FUA,
#endif
		};
		disk = blk_mq_alloc_disk(&dev->tag_set, &lim, dev);
	}
#else
	disk = blk_mq_alloc_disk(&dev->tag_set, dev);
#endif
	if (IS_ERR(disk)) {
		err = PTR_ERR(disk);
		goto out_tags;
	}
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 9, 0)
	blk_queue_logical_block_size(disk->queue, SECTOR_SIZE);
	blk_queue_physical_block_size(disk->queue, min_t(u32, a.block_size, PAGE_SIZE));
	blk_queue_io_min(disk->queue, a.block_size);
	blk_queue_max_hw_sectors(disk->queue, 2048);
#endif
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 11, 0)
	blk_queue_write_cache(disk->queue, true, true);
#endif
	disk->major = uloop_major;
	disk->first_minor = dev->index;
	disk->minors = 1;
	disk->fops = &uloop_fops;
	disk->private_data = dev;
	disk->flags |= GENHD_FL_NO_PART;
	snprintf(disk->disk_name, DISK_NAME_LEN, "uloop%d", dev->index);
	set_capacity(disk, a.size >> SECTOR_SHIFT);
	if (!(a.flags & ULOOP_F_WRITEBACK))
		set_disk_ro(disk, true);
	dev->disk = disk;
	dev->cache = file;
	err = add_disk(disk);
	if (err)
		goto out_disk;

	a.index = dev->index;
	if (put_user(a.index, &uarg->index))
		pr_warn("uloop%d: could not return the index to the caller\n", dev->index);
	/* The calling fd is the device's daemon from now on. */
	kref_get(&dev->kref);
	spin_lock_irq(&dev->lock);
	conn->dev = dev;
	dev->daemon = conn;
	spin_unlock_irq(&dev->lock);
	__module_get(THIS_MODULE);
	return 0;

out_disk:
	put_disk(disk);
out_tags:
	blk_mq_free_tag_set(&dev->tag_set);
out_wq:
	destroy_workqueue(dev->wq);
out_idr:
	mutex_lock(&uloop_ctl_mutex);
	idr_remove(&uloop_idr, dev->index);
	mutex_unlock(&uloop_ctl_mutex);
out_free:
	kref_put(&dev->kref, uloop_free);
out_fput:
	fput(file);
	return err;
}

/* Teardown mirrors uloop_add: disk, tag set, workqueue, idr, cache file, module pin, memory. */
static int uloop_remove(u32 index)
{
	struct uloop_dev *dev;

	mutex_lock(&uloop_ctl_mutex);
	dev = idr_find(&uloop_idr, index);
	if (!dev) {
		mutex_unlock(&uloop_ctl_mutex);
		return -ENODEV;
	}
	if (disk_openers(dev->disk)) {
		mutex_unlock(&uloop_ctl_mutex);
		return -EBUSY;
	}
	idr_remove(&uloop_idr, index);
	mutex_unlock(&uloop_ctl_mutex);

	spin_lock_irq(&dev->lock);
	dev->dead = true;
	uloop_fail_all(dev);
	spin_unlock_irq(&dev->lock);
	wake_up_all(&dev->msg_wait);

	/* del_gendisk waits for every request, so rq_list is empty; destroy_workqueue drains rq_work */
	del_gendisk(dev->disk);
	put_disk(dev->disk);
	blk_mq_free_tag_set(&dev->tag_set);
	destroy_workqueue(dev->wq);
	WARN_ON_ONCE(!list_empty(&dev->rq_list));
	fput(dev->cache);
	dev->cache = NULL;
	kref_put(&dev->kref, uloop_free);
	module_put(THIS_MODULE);
	return 0;
}

/* ---- the control device ---------------------------------------------------------------------- */

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

static int uloop_query(struct uloop_info __user *uarg)
{
	struct uloop_info info;
	struct uloop_dev *dev;

	if (copy_from_user(&info, uarg, sizeof(info)))
		return -EFAULT;
	dev = uloop_get(info.index);
	if (!dev)
		return -ENODEV;
	memset(&info, 0, sizeof(info));
	info.version = ULOOP_ABI_VERSION;
	info.index = dev->index;
	info.size = dev->size;
	info.block_size = dev->block_size;
	info.flags = dev->flags;
	info.nr_blocks = dev->nr_blocks;
	spin_lock_irq(&dev->lock);
	info.present_blocks = bitmap_weight(dev->present, dev->nr_blocks);
	info.dirty_blocks = bitmap_weight(dev->dirty, dev->nr_blocks);
	info.epoch = dev->epoch;
	info.attached = dev->daemon != NULL;
	info.waiting = list_count_nodes(&dev->queued) + list_count_nodes(&dev->sent);
	spin_unlock_irq(&dev->lock);
	kref_put(&dev->kref, uloop_free);
	return copy_to_user(uarg, &info, sizeof(info)) ? -EFAULT : 0;
}

static int uloop_attach(struct uloop_conn *conn, struct uloop_attach __user *uarg)
{
	struct uloop_attach a;
	struct uloop_dev *dev;
	int err = 0;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	if (a.version != ULOOP_ABI_VERSION)
		return -EPROTO;
	if (conn->dev)
		return -EBUSY;
	dev = uloop_get(a.index);
	if (!dev)
		return -ENODEV;
	spin_lock_irq(&dev->lock);
	if (dev->dead || dev->daemon) {
		err = dev->dead ? -ENODEV : -EBUSY;
	} else {
		dev->daemon = conn;
		conn->dev = dev; /* keeps the reference uloop_get took */
	}
	spin_unlock_irq(&dev->lock);
	if (err)
		kref_put(&dev->kref, uloop_free);
	else
		wake_up_interruptible(&dev->msg_wait);
	return err;
}

static int uloop_barrier_bits(struct uloop_dev *dev, struct uloop_barrier_bits __user *uarg)
{
	size_t bytes = DIV_ROUND_UP(dev->nr_blocks, 8);
	struct uloop_barrier_bits a;
	unsigned long *p, *d;
	struct uloop_cmd *c;
	int err = -ENOENT;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	if (a.length < bytes)
		return -EINVAL;
	p = kvzalloc(uloop_bitmap_bytes(dev->nr_blocks), GFP_KERNEL);
	d = kvzalloc(uloop_bitmap_bytes(dev->nr_blocks), GFP_KERNEL);
	if (!p || !d) {
		err = -ENOMEM;
		goto out;
	}
	spin_lock_irq(&dev->lock);
	list_for_each_entry(c, &dev->sent, node) {
		if (c->msg.id == a.id && c->msg.type == ULOOP_MSG_BARRIER) {
			bitmap_copy(p, c->bar_present, dev->nr_blocks);
			bitmap_copy(d, c->bar_dirty, dev->nr_blocks);
			err = 0;
			break;
		}
	}
	spin_unlock_irq(&dev->lock);
	if (!err && (copy_to_user(u64_to_user_ptr(a.present_ptr), p, bytes) ||
		     copy_to_user(u64_to_user_ptr(a.dirty_ptr), d, bytes)))
		err = -EFAULT;
out:
	kvfree(p);
	kvfree(d);
	return err;
}

/*
 * EPOCH_BEGIN / EPOCH_COMMIT: the flusher's snapshot of the dirty set and its commit (durability
 * rule 7 of docs/design.md; the daemon narrows the snapshot to blocks its store has dirty too and
 * clears the store's bits right after COMMIT, in the same tick, so the two agree).
 *
 * Why this is right against concurrent writes. A write to a block changes the cache file in one of
 * two ways: through an INTENT (the block was clean: uloop_prepare asks the daemon, sets the dirty
 * bit, then loops once more), or directly (the block was dirty, or missing and covered whole). In
 * both cases the *last* pass of uloop_prepare decides "no daemon round trip needed" and, in the
 * same dev->lock section, marks the write's blocks `rewritten` if an epoch is open and puts the
 * write on dev->inflight, where it stays until its cache-file I/O completed. So under dev->lock:
 *  - a write whose last prepare pass ran before BEGIN either completed before BEGIN (its data is in
 *    the page cache when the flusher reads; the daemon syncs the cache file after BEGIN, so that
 *    data is durable before COMMIT), or is still on dev->inflight and BEGIN marks it rewritten;
 *  - a write whose last pass runs between BEGIN and COMMIT marks itself rewritten;
 *  - a write whose last pass runs after COMMIT finds a cleared block clean and needs an INTENT,
 *    whose answer comes after the daemon cleared the store's bit too (rule 3 holds again).
 * COMMIT clears only flushed & dirty & ~rewritten, so every block it clears holds exactly the
 * content the flusher could have read after BEGIN, which the daemon wrote to the source and synced
 * before COMMIT (invariant 4), and is durable in the cache (invariant 2). A block rewritten during
 * the epoch keeps its dirty bit, whatever the flusher read (old, new or torn): the next epoch
 * writes it again. The kernel keeps no copy-on-write of such blocks, so unlike the userspace path
 * the disk is not a point-in-time image until the next flush completes (docs/design.md).
 * A block whose INTENT is in flight is clean here and busy: it is neither snapshotted as dirty nor
 * cleared. A BEGIN while an epoch is open (the flusher gave up on it) starts a new one; a COMMIT
 * for any but the latest BEGIN is refused with ESTALE and clears nothing.
 */
static int uloop_epoch(struct uloop_dev *dev, struct uloop_epoch __user *uarg, bool begin)
{
	size_t bytes = DIV_ROUND_UP(dev->nr_blocks, 8);
	size_t words = BITS_TO_LONGS(dev->nr_blocks);
	struct uloop_epoch a;
	struct uloop_rq *pdu;
	unsigned long *bits;
	size_t i;
	int err = 0;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	if (a.length < bytes)
		return -EINVAL;
	bits = kvzalloc(uloop_bitmap_bytes(dev->nr_blocks), GFP_KERNEL);
	if (!bits)
		return -ENOMEM;
	if (!begin && uloop_load_bitmap(bits, a.dirty_ptr, dev->nr_blocks)) {
		err = -EFAULT;
		goto out;
	}
	spin_lock_irq(&dev->lock);
	if (begin) {
		bitmap_copy(bits, dev->dirty, dev->nr_blocks);
		bitmap_zero(dev->rewritten, dev->nr_blocks);
		/* writes in flight now count as touching their blocks */
		list_for_each_entry(pdu, &dev->inflight, inflight)
			bitmap_set(dev->rewritten, pdu->first, pdu->last - pdu->first + 1);
		a.epoch = ++dev->epoch;
		dev->epoch_open = true;
	} else if (!dev->epoch_open || a.epoch != dev->epoch) {
		err = -ESTALE;
	} else {
		for (i = 0; i < words; i++) {
			bits[i] &= dev->dirty[i] & ~dev->rewritten[i];
			dev->dirty[i] &= ~bits[i];
		}
		a.cleared = bitmap_weight(bits, dev->nr_blocks);
		dev->epoch_open = false;
	}
	spin_unlock_irq(&dev->lock);
	if (!err && (copy_to_user(u64_to_user_ptr(a.dirty_ptr), bits, bytes) ||
		     copy_to_user(uarg, &a, sizeof(a))))
		err = -EFAULT;
out:
	kvfree(bits);
	return err;
}

static long uloop_ctl_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct uloop_conn *conn = file->private_data;
	void __user *uarg = (void __user *)arg;
	u32 index;

	switch (cmd) {
	case ULOOP_IOC_ADD:
		return uloop_add(conn, uarg);
	case ULOOP_IOC_REMOVE:
		if (get_user(index, (u32 __user *)uarg))
			return -EFAULT;
		return uloop_remove(index);
	case ULOOP_IOC_QUERY:
		return uloop_query(uarg);
	case ULOOP_IOC_ATTACH:
		return uloop_attach(conn, uarg);
	case ULOOP_IOC_BARRIER_BITS:
		return conn->dev ? uloop_barrier_bits(conn->dev, uarg) : -ENOTCONN;
	case ULOOP_IOC_EPOCH_BEGIN:
	case ULOOP_IOC_EPOCH_COMMIT:
		return conn->dev ? uloop_epoch(conn->dev, uarg, cmd == ULOOP_IOC_EPOCH_BEGIN) : -ENOTCONN;
	default:
		return -ENOTTY;
	}
}

static ssize_t uloop_ctl_read(struct file *file, char __user *buf, size_t count, loff_t *ppos)
{
	struct uloop_conn *conn = file->private_data;
	struct uloop_dev *dev = conn->dev;
	struct uloop_msg *msgs;
	size_t n = 0, max = min_t(size_t, count / sizeof(*msgs), ULOOP_MAX_BATCH);
	ssize_t ret;

	if (!dev)
		return -ENOTCONN;
	if (!max)
		return -EINVAL;
	msgs = kmalloc_array(max, sizeof(*msgs), GFP_KERNEL);
	if (!msgs)
		return -ENOMEM;
	for (;;) {
		struct uloop_cmd *c, *tmp;

		spin_lock_irq(&dev->lock);
		if (dev->dead) {
			spin_unlock_irq(&dev->lock);
			ret = -ENODEV;
			goto out;
		}
		list_for_each_entry_safe(c, tmp, &dev->queued, node) {
			if (n == max)
				break;
			msgs[n++] = c->msg;
			list_move_tail(&c->node, &dev->sent);
		}
		spin_unlock_irq(&dev->lock);
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
	/* On a fault the messages stay on `sent` and are re-issued if this daemon detaches. */
	ret = copy_to_user(buf, msgs, n * sizeof(*msgs)) ? -EFAULT : n * sizeof(*msgs);
out:
	kfree(msgs);
	return ret;
}

static ssize_t uloop_ctl_write(struct file *file, const char __user *buf, size_t count,
			       loff_t *ppos)
{
	struct uloop_conn *conn = file->private_data;
	struct uloop_dev *dev = conn->dev;
	size_t i, n = count / sizeof(struct uloop_reply);

	if (!dev)
		return -ENOTCONN;
	if (!n || count % sizeof(struct uloop_reply))
		return -EINVAL;
	for (i = 0; i < n; i++) {
		struct uloop_reply r;
		struct uloop_cmd *c;

		if (copy_from_user(&r, buf + i * sizeof(r), sizeof(r)))
			return i ? i * sizeof(r) : -EFAULT;
		if (r.error > 0 || r.error < -MAX_ERRNO)
			return i ? i * sizeof(r) : -EINVAL;
		spin_lock_irq(&dev->lock);
		list_for_each_entry(c, &dev->sent, node) {
			if (c->msg.id == r.id) {
				uloop_cmd_finish(c, r.error);
				break;
			}
		}
		spin_unlock_irq(&dev->lock);
	}
	return count;
}

static __poll_t uloop_ctl_poll(struct file *file, poll_table *wait)
{
	struct uloop_conn *conn = file->private_data;
	struct uloop_dev *dev = conn->dev;
	__poll_t mask = 0;

	if (!dev)
		return EPOLLERR;
	poll_wait(file, &dev->msg_wait, wait);
	spin_lock_irq(&dev->lock);
	if (!list_empty(&dev->queued))
		mask |= EPOLLIN | EPOLLRDNORM;
	if (dev->dead)
		mask |= EPOLLHUP;
	spin_unlock_irq(&dev->lock);
	return mask | EPOLLOUT | EPOLLWRNORM;
}

static int uloop_ctl_open(struct inode *inode, struct file *file)
{
	struct uloop_conn *conn = kzalloc(sizeof(*conn), GFP_KERNEL);

	if (!conn)
		return -ENOMEM;
	file->private_data = conn;
	return stream_open(inode, file);
}

/* The daemon went away: its unanswered messages go back to the queue for the next one. */
static int uloop_ctl_release(struct inode *inode, struct file *file)
{
	struct uloop_conn *conn = file->private_data;
	struct uloop_dev *dev = conn->dev;

	if (dev) {
		spin_lock_irq(&dev->lock);
		if (dev->daemon == conn) {
			dev->daemon = NULL;
			dev->detached_at = jiffies;
			list_splice_init(&dev->sent, &dev->queued);
		}
		spin_unlock_irq(&dev->lock);
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
	int err;

	uloop_major = register_blkdev(0, "uloop");
	if (uloop_major < 0)
		return uloop_major;
	err = misc_register(&uloop_misc);
	if (err) {
		unregister_blkdev(uloop_major, "uloop");
		return err;
	}
	return 0;
}

/* Runs only with no devices left: each one pins the module. */
static void __exit uloop_exit(void)
{
	misc_deregister(&uloop_misc);
	unregister_blkdev(uloop_major, "uloop");
	idr_destroy(&uloop_idr);
}

module_init(uloop_init);
module_exit(uloop_exit);
MODULE_DESCRIPTION("uloop: block device over a cache file, with misses and barriers in userspace");
MODULE_LICENSE("GPL");
