// Replays a dm-log-writes log onto a device up to a mark (Debian ships no replay-log tool).
//
//   log-replay LOG DEV MARK [--strict]     replay every entry before MARK; exit 3 if MARK is absent
//   log-replay LOG - -                      list the entries (flags, sector, count, mark names)
//
// Format (drivers/md/dm-log-writes.c): a superblock in the first sector {magic, version,
// nr_entries, sectorsize}; from byte `sectorsize` on, entries of one sectorsize-long metadata block
// {sector, nr_sectors, flags, data_len} (little-endian u64; sector and nr_sectors in sectorsize
// units; a mark's name follows the struct), then nr_sectors of data unless the entry is a DISCARD.
// Entries are in the order the writes completed, and a write is logged only once a FLUSH covered
// it (or it was FUA). --strict drops the writes logged after the last FLUSH before the mark that
// are not FUA: a power loss may lose any of those, so what survives that is the least a crash at
// the mark leaves. DISCARD ranges are written with zeros.
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define LOG_FLUSH 1
#define LOG_FUA 2
#define LOG_DISCARD 4
#define LOG_MARK 8
#define LOG_MAGIC 0x6a736677736872ULL

struct entry {
	uint64_t sector, nr_sectors, flags, data_len;
	char mark[512];
	off_t data_off; // where its data is in the log
};

static void die(const char *what)
{
	fprintf(stderr, "log-replay: %s: %s\n", what, strerror(errno));
	exit(2);
}

static void read_at(int fd, void *buf, size_t len, off_t off)
{
	size_t done = 0;
	while (done < len) {
		ssize_t n = pread(fd, (char *)buf + done, len - done, off + done);
		if (n < 0) die("read log");
		if (n == 0) { errno = EIO; die("log truncated"); }
		done += n;
	}
}

static void write_at(int fd, const void *buf, size_t len, off_t off)
{
	size_t done = 0;
	while (done < len) {
		ssize_t n = pwrite(fd, (const char *)buf + done, len - done, off + done);
		if (n <= 0) die("write device");
		done += n;
	}
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: log-replay LOG DEV MARK [--strict] | log-replay LOG - -\n");
		return 2;
	}
	int strict = argc > 4 && strcmp(argv[4], "--strict") == 0;
	int list = strcmp(argv[2], "-") == 0;
	int log = open(argv[1], O_RDONLY);
	if (log < 0) die(argv[1]);

	uint64_t super[4];
	read_at(log, super, sizeof(super), 0);
	if (le64toh(super[0]) != LOG_MAGIC) { errno = EINVAL; die("not a dm-log-writes log"); }
	uint64_t nr = le64toh(super[2]);
	uint32_t ss = le64toh(super[3]) & 0xffffffffu;
	if (ss < 512 || ss > 4096 || (ss & (ss - 1))) { errno = EINVAL; die("bad sector size"); }

	// Index the entries up to the mark.
	struct entry *e = calloc(nr ? nr : 1, sizeof(*e));
	char *meta = malloc(ss);
	if (!e || !meta) die("malloc");
	off_t pos = ss;
	uint64_t n, end = nr;
	for (n = 0; n < nr; n++) {
		read_at(log, meta, ss, pos);
		uint64_t f[4];
		memcpy(f, meta, sizeof(f));
		e[n].sector = le64toh(f[0]);
		e[n].nr_sectors = le64toh(f[1]);
		e[n].flags = le64toh(f[2]);
		e[n].data_len = le64toh(f[3]);
		if (e[n].flags & LOG_MARK) {
			size_t l = e[n].data_len < sizeof(e[n].mark) - 1 ? e[n].data_len : sizeof(e[n].mark) - 1;
			memcpy(e[n].mark, meta + 32, l);
		}
		e[n].data_off = pos + ss;
		pos += ss;
		if (!(e[n].flags & LOG_DISCARD)) pos += (off_t)e[n].nr_sectors * ss;
		if (list)
			printf("%llu flags=%llu sector=%llu n=%llu%s%s\n", (unsigned long long)n, (unsigned long long)e[n].flags,
			       (unsigned long long)e[n].sector, (unsigned long long)e[n].nr_sectors,
			       e[n].flags & LOG_MARK ? " mark=" : "", e[n].mark);
		else if ((e[n].flags & LOG_MARK) && strcmp(e[n].mark, argv[3]) == 0) {
			end = n;
			break;
		}
	}
	if (list) return 0;
	if (end == nr) {
		fprintf(stderr, "log-replay: mark %s not in the log (%llu entries)\n", argv[3], (unsigned long long)nr);
		return 3;
	}

	uint64_t last_flush = 0; // entries before this index are covered by a FLUSH
	for (n = 0; n < end; n++)
		if (e[n].flags & LOG_FLUSH) last_flush = n + 1;

	int dev = open(argv[2], O_WRONLY);
	if (dev < 0) die(argv[2]);
	size_t cap = 1 << 20;
	char *buf = malloc(cap);
	if (!buf) die("malloc");
	uint64_t applied = 0, dropped = 0;
	for (n = 0; n < end; n++) {
		if (!e[n].nr_sectors) continue;
		if (strict && n >= last_flush && !(e[n].flags & LOG_FUA)) { dropped++; continue; }
		off_t off = (off_t)e[n].sector * ss;
		uint64_t len = e[n].nr_sectors * ss, done = 0;
		if (e[n].flags & LOG_DISCARD) memset(buf, 0, cap);
		while (done < len) {
			size_t chunk = len - done < cap ? len - done : cap;
			if (!(e[n].flags & LOG_DISCARD)) read_at(log, buf, chunk, e[n].data_off + done);
			write_at(dev, buf, chunk, off + done);
			done += chunk;
		}
		applied++;
	}
	if (fsync(dev)) die("fsync device");
	printf("replayed %llu of %llu entries to mark %s (%llu unflushed writes dropped)\n", (unsigned long long)applied,
	       (unsigned long long)end, argv[3], (unsigned long long)dropped);
	return 0;
}
