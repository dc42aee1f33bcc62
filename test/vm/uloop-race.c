// uloop-race: concurrent writers with fsyncs at random points, and the check of a replayed image
// against what they were told was done (test/vm/uloop-durability.test.ts).
//
//   uloop-race init FILE UNITS
//       writes generation 0 of units [0, UNITS) into FILE (the disk's first content)
//   uloop-race write DEV BS BLOCKS WRITERS OPS LOGDIR DM_NAME SEED
//       WRITERS processes write to DEV (O_DIRECT) for OPS writes each. Writer w owns the blocks
//       b % WRITERS == w of [0, BLOCKS) (BS bytes each), so a unit has one writer and its
//       generations only grow. Each write is a whole block or one 4 KiB unit of it, at random;
//       after about one write in eight the writer calls fsync or fdatasync, then puts a mark
//       "wW.K" into the dm-log-writes target DM_NAME (DM_TARGET_MSG, no process spawned, so the
//       mark lands right after the FLUSH). LOGDIR/wW.log gets one line per acknowledged write
//       ("W unit count gen t_ack") and per sync ("F mark t_start t_end"), times CLOCK_MONOTONIC ns.
//   uloop-race verify IMAGE UNITS LOGDIR MARK
//       checks a device image taken at MARK: every unit holds a generation some writer wrote (or
//       generation 0), whole and not torn, and at least the newest one acknowledged before MARK's
//       sync began (a FLUSH covers every write completed before it was issued). Prints
//       "verify MARK: units N required R wrong W stale S" and exits 1 when W or S is not 0.
//
// Unit u at generation g: word 0 is u, word 1 is g, the rest splitmix(u, g, i).
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/dm-ioctl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define UNIT 4096

static uint64_t splitmix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

static void unit_fill(uint64_t *w, uint64_t u, uint64_t g)
{
	w[0] = u;
	w[1] = g;
	for (int i = 2; i < UNIT / 8; i++)
		w[i] = splitmix(u * 1000003 + g * 7919 + i);
}

/* The generation unit u holds, or UINT64_MAX when it holds no whole generation of u. */
static uint64_t unit_gen(const uint64_t *w, uint64_t u)
{
	uint64_t want[UNIT / 8];

	if (w[0] != u)
		return UINT64_MAX;
	unit_fill(want, u, w[1]);
	return memcmp(want, w, UNIT) ? UINT64_MAX : w[1];
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

static void die(const char *what)
{
	fprintf(stderr, "uloop-race: %s: %s\n", what, strerror(errno));
	exit(2);
}

/* "mark NAME" to the dm target DM_NAME, as `dmsetup message DM_NAME 0 mark NAME` does. */
static void dm_mark(int ctl, const char *dm_name, const char *mark)
{
	union {
		struct dm_ioctl io;
		char buf[sizeof(struct dm_ioctl) + sizeof(struct dm_target_msg) + 128];
	} m;
	struct dm_target_msg *msg;

	memset(&m, 0, sizeof(m));
	m.io.version[0] = DM_VERSION_MAJOR;
	m.io.data_size = sizeof(m);
	m.io.data_start = sizeof(struct dm_ioctl);
	snprintf(m.io.name, sizeof(m.io.name), "%s", dm_name);
	msg = (struct dm_target_msg *)(m.buf + m.io.data_start);
	msg->sector = 0;
	snprintf(msg->message, 100, "mark %s", mark);
	if (ioctl(ctl, DM_TARGET_MSG, &m))
		die("DM_TARGET_MSG mark");
}

static int cmd_init(char **argv)
{
	uint64_t units = strtoull(argv[3], 0, 0), w[UNIT / 8];
	int fd = open(argv[2], O_WRONLY | O_CREAT, 0644);

	if (fd < 0)
		die(argv[2]);
	for (uint64_t u = 0; u < units; u++) {
		unit_fill(w, u, 0);
		if (pwrite(fd, w, UNIT, u * UNIT) != UNIT)
			die("write");
	}
	return close(fd) ? 2 : 0;
}

static void writer(int w, const char *dev, uint64_t bs, uint64_t blocks, int writers, int ops, const char *logdir,
		   const char *dm_name, unsigned seed)
{
	uint64_t per = bs / UNIT, seq = 0, *buf = aligned_alloc(4096, bs);
	char path[512], mark[64];
	int fd = open(dev, O_WRONLY | O_DIRECT), ctl = open("/dev/mapper/control", O_RDWR), syncs = 0;
	FILE *log;

	snprintf(path, sizeof(path), "%s/w%d.log", logdir, w);
	log = fopen(path, "w");
	if (fd < 0 || ctl < 0 || !buf || !log)
		die("writer setup");
	srand(seed * 31 + w);
	for (int op = 0; op < ops; op++) {
		uint64_t b = (uint64_t)(rand() % ((blocks - w + writers - 1) / writers)) * writers + w;
		uint64_t gen = ((uint64_t)(w + 1) << 32) | ++seq, first = b * per, n = per;

		if (rand() % 2) { /* one 4 KiB unit of the block */
			first += rand() % per;
			n = 1;
		}
		for (uint64_t i = 0; i < n; i++)
			unit_fill(buf + i * (UNIT / 8), first + i, gen);
		if (pwrite(fd, buf, n * UNIT, first * UNIT) != (ssize_t)(n * UNIT))
			die("pwrite");
		fprintf(log, "W %llu %llu %llu %llu\n", (unsigned long long)first, (unsigned long long)n,
			(unsigned long long)gen, (unsigned long long)now_ns());
		fflush(log);
		if (rand() % 8 == 0) {
			uint64_t t0 = now_ns();

			if ((rand() % 2 ? fsync(fd) : fdatasync(fd)))
				die("fsync");
			snprintf(mark, sizeof(mark), "w%d.%d", w, ++syncs);
			dm_mark(ctl, dm_name, mark);
			fprintf(log, "F %s %llu %llu\n", mark, (unsigned long long)t0, (unsigned long long)now_ns());
			fflush(log);
		}
		usleep(rand() % 20000);
	}
	fclose(log);
	_exit(0);
}

static int cmd_write(char **argv)
{
	uint64_t bs = strtoull(argv[3], 0, 0), blocks = strtoull(argv[4], 0, 0);
	int writers = atoi(argv[5]), ops = atoi(argv[6]), st, bad = 0;
	unsigned seed = strtoul(argv[9], 0, 0);

	if (bs % UNIT || !bs || writers < 1 || (uint64_t)writers > blocks)
		return fprintf(stderr, "uloop-race: bad BS or WRITERS\n"), 2;
	for (int w = 0; w < writers; w++)
		if (!fork())
			writer(w, argv[2], bs, blocks, writers, ops, argv[7], argv[8], seed);
	while (wait(&st) > 0)
		bad |= !WIFEXITED(st) || WEXITSTATUS(st);
	return bad;
}

/* The writers' logs: acknowledged writes and syncs. */
struct ack {
	uint64_t first, n, gen, t;
};

static int cmd_verify(char **argv)
{
	uint64_t units = strtoull(argv[3], 0, 0), t_start = 0, nacks = 0, cap = 1024;
	uint64_t *req = calloc(units, sizeof(uint64_t)), *w = aligned_alloc(4096, UNIT);
	uint64_t required = 0, wrong = 0, stale = 0;
	struct ack *acks = malloc(cap * sizeof(*acks));
	char path[512], line[256], name[64];
	int found = 0, img = open(argv[2], O_RDONLY);

	if (img < 0 || !req || !w || !acks)
		die("verify setup");
	for (int k = 0;; k++) {
		FILE *f;

		snprintf(path, sizeof(path), "%s/w%d.log", argv[4], k);
		f = fopen(path, "r");
		if (!f)
			break;
		while (fgets(line, sizeof(line), f)) {
			unsigned long long a, b, c, d;

			if (sscanf(line, "W %llu %llu %llu %llu", &a, &b, &c, &d) == 4) {
				if (nacks == cap)
					acks = realloc(acks, (cap *= 2) * sizeof(*acks));
				acks[nacks++] = (struct ack){ a, b, c, d };
			} else if (sscanf(line, "F %63s %llu %llu", name, &a, &b) == 3 && !strcmp(name, argv[5])) {
				t_start = a;
				found = 1;
			}
		}
		fclose(f);
	}
	if (!found)
		return fprintf(stderr, "uloop-race: mark %s is in no writer's log\n", argv[5]), 2;
	for (uint64_t i = 0; i < nacks; i++)
		if (acks[i].t < t_start)
			for (uint64_t u = acks[i].first; u < acks[i].first + acks[i].n && u < units; u++)
				if (acks[i].gen > req[u])
					req[u] = acks[i].gen;
	for (uint64_t u = 0; u < units; u++) {
		uint64_t g;

		if (pread(img, w, UNIT, u * UNIT) != UNIT)
			die("read image");
		g = unit_gen(w, u);
		required += req[u] != 0;
		if (g == UINT64_MAX) {
			if (wrong++ < 5)
				printf("unit %llu (block byte %llu): no whole generation (word0 %llu word1 %llu)\n",
				       (unsigned long long)u, (unsigned long long)u * UNIT, (unsigned long long)w[0],
				       (unsigned long long)w[1]);
		} else if (g < req[u]) {
			if (stale++ < 5)
				printf("unit %llu: generation %llx, but %llx was acknowledged before the sync\n",
				       (unsigned long long)u, (unsigned long long)g, (unsigned long long)req[u]);
		}
	}
	printf("verify %s: units %llu required %llu wrong %llu stale %llu\n", argv[5], (unsigned long long)units,
	       (unsigned long long)required, (unsigned long long)wrong, (unsigned long long)stale);
	return wrong || stale;
}

int main(int argc, char **argv)
{
	if (argc == 4 && !strcmp(argv[1], "init"))
		return cmd_init(argv);
	if (argc == 10 && !strcmp(argv[1], "write"))
		return cmd_write(argv);
	if (argc == 6 && !strcmp(argv[1], "verify"))
		return cmd_verify(argv);
	fprintf(stderr, "usage: see the top of test/vm/uloop-race.c\n");
	return 2;
}
