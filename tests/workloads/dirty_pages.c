/*
 * Dirty pages: memory written in phases between periodic checkpoints (incremental images).
 *
 * usage: dirty_pages SERIES PHASES [fork]
 *
 * A 64 MiB private anonymous region A. Phase k (1..PHASES) writes a PRNG-chosen share of A's
 * pages (5 %; 40 % in phase 3, enough for a copy-on-write snapshot) with a pattern of (page,
 * phase), releases a few pages with MADV_DONTNEED (they read as zeros), moves region B with
 * mremap and grows it, and maps a fresh region C over the old one at the same address; then
 * prints "phase k" and waits until SERIES/latest names a newer checkpoint. All the while a
 * thread writes one word at a time into region D (a sequence number in page seq % 256), so
 * that some pages are written while a checkpoint copies memory.
 * After the last phase it waits for the file SERIES/go (made by the test once the job is
 * restored from its latest checkpoint), stops the thread and checks every page of A, B, C and
 * D against what the phases and the sequence number say they must hold: PASS, or FAIL at the
 * first wrong page.
 * With "fork", a child forked once A is written shares A with the job (copy-on-write) and
 * never writes it: as the phases write the job's copy, the child keeps the pages of phase 40.
 * Once SERIES/go exists it checks them; the job FAILs unless the child passed.
 */
#include "wl.h"

#include <limits.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>

#define PAGE 4096UL
#define A_PAGES (16384UL)            /* 64 MiB */
#define B_PAGES (256UL)              /* 1 MiB, grown by 64 pages a phase */
#define C_PAGES (64UL)
#define D_PAGES (4096UL)            /* written one page every 2 ms: a round takes 8 s */
#define MAX_PHASES 32

static char *a, *b, *c;
static volatile uint64_t *d;
static volatile uint64_t seq;          /* the last sequence number written into D */
static volatile int stop;
static int8_t a_phase[A_PAGES];        /* phase that wrote the page last; -1: released */
static size_t b_pages = B_PAGES;
static int c_phase;

static uint64_t pattern(uint64_t region, uint64_t page, uint64_t phase, uint64_t word)
{
	uint64_t x = (region << 56) ^ (page << 24) ^ (phase << 12) ^ word;

	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdULL;
	x ^= x >> 33;
	return x | 1;  /* never 0: a page of zeros is never a written page */
}

static void fill(char *page, uint64_t region, uint64_t index, uint64_t phase)
{
	uint64_t *w = (uint64_t *)page;

	for (size_t i = 0; i < PAGE / 8; i++)
		w[i] = pattern(region, index, phase, i);
}

static int holds(const char *page, uint64_t region, uint64_t index, uint64_t phase)
{
	const uint64_t *w = (const uint64_t *)page;

	for (size_t i = 0; i < PAGE / 8; i++)
		if (w[i] != (phase ? pattern(region, index, phase, i) : 0))
			return 0;
	return 1;
}

static uint64_t xorshift(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

static void *writer(void *arg)
{
	(void)arg;
	while (!stop) {
		uint64_t next = seq + 1;

		d[(next % D_PAGES) * (PAGE / 8)] = next;
		seq = next;
		usleep(2000);
	}
	return NULL;
}

static void phase(int k)
{
	uint64_t s = 0x9e3779b97f4a7c15ULL * (uint64_t)k;
	size_t writes = (k == 3 ? 40 : 5) * A_PAGES / 100;

	for (size_t i = 0; i < writes; i++) {
		size_t p = xorshift(&s) % A_PAGES;

		fill(a + p * PAGE, 1, p, k);
		a_phase[p] = k;
	}
	size_t first = xorshift(&s) % (A_PAGES - 8);  /* released: zeros from now on */

	if (madvise(a + first * PAGE, 8 * PAGE, MADV_DONTNEED))
		wl_die("madvise");
	memset(a_phase + first, -1, 8);

	char *moved = mremap(b, b_pages * PAGE, (b_pages + 64) * PAGE, MREMAP_MAYMOVE);

	if (moved == MAP_FAILED)
		wl_die("mremap");
	b = moved;
	for (size_t p = b_pages; p < b_pages + 64; p++)
		fill(b + p * PAGE, 2, p, k);
	b_pages += 64;

	if (mmap(c, C_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
		 -1, 0) != c)
		wl_die("mmap over C");
	for (size_t p = 0; p < C_PAGES; p += 2)  /* the odd pages stay zeros */
		fill(c + p * PAGE, 3, p, k);
	c_phase = k;
}

static char *latest(const char *series, char *buf, size_t size)
{
	char link[PATH_MAX];
	ssize_t n;

	snprintf(link, sizeof(link), "%s/latest", series);
	n = readlink(link, buf, size - 1);
	buf[n < 0 ? 0 : n] = 0;
	return buf;
}

static void check(void)
{
	for (size_t p = 0; p < A_PAGES; p++)
		if (!holds(a + p * PAGE, 1, p, a_phase[p] < 0 ? 0 : a_phase[p])) {
			wl_fail("A page %zu (phase %d)", p, a_phase[p]);
			return;
		}
	for (size_t p = 0; p < b_pages; p++) {
		int k = p < B_PAGES ? 0 : (int)((p - B_PAGES) / 64) + 1;

		if (!holds(b + p * PAGE, 2, p, k)) {
			wl_fail("B page %zu (phase %d)", p, k);
			return;
		}
	}
	for (size_t p = 0; p < C_PAGES; p++)
		if (!holds(c + p * PAGE, 3, p, p % 2 ? 0 : c_phase)) {
			wl_fail("C page %zu (phase %d)", p, c_phase);
			return;
		}
	for (uint64_t p = 0; p < D_PAGES; p++) {
		/* the last number written into page p; the thread may have been stopped between
		 * its write of seq + 1 and the update of seq */
		uint64_t last = seq, got = d[p * (PAGE / 8)];
		uint64_t want = last < p ? 0 : last - (last - p) % D_PAGES;

		if (got != want && !(got == last + 1 && (last + 1) % D_PAGES == p)) {
			wl_fail("D page %lu holds %lu, not %lu (seq %lu)", (unsigned long)p,
				(unsigned long)got, (unsigned long)want, (unsigned long)last);
			return;
		}
	}
}

int main(int argc, char **argv)
{
	char go[PATH_MAX], seen[PATH_MAX], now[PATH_MAX];
	pthread_t thread;
	struct stat st;
	pid_t child = 0;
	int phases, status;

	if (argc < 3 || argc > 4 || (argc == 4 && strcmp(argv[3], "fork")) ||
	    (phases = atoi(argv[2])) < 1 || phases > MAX_PHASES) {
		fprintf(stderr, "usage: dirty_pages SERIES PHASES [fork]\n");
		return 2;
	}
	snprintf(go, sizeof(go), "%s/go", argv[1]);
	a = mmap(NULL, A_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	b = mmap(NULL, B_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	c = mmap(NULL, C_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	d = mmap(NULL, D_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (a == MAP_FAILED || b == MAP_FAILED || c == MAP_FAILED || d == MAP_FAILED)
		wl_die("mmap");
	for (size_t p = 0; p < A_PAGES; p++)
		fill(a + p * PAGE, 1, p, 40);  /* as if by a phase 40 */
	memset(a_phase, 40, sizeof(a_phase));
	memset(b, 0, B_PAGES * PAGE);
	memset((void *)d, 0, D_PAGES * PAGE);  /* present: a later write is to a saved page */
	if (argc == 4 && (child = fork()) < 0)
		wl_die("fork");
	if (child == 0 && argc == 4) {
		while (stat(go, &st))
			usleep(10000);
		for (size_t p = 0; p < A_PAGES; p++)
			if (!holds(a + p * PAGE, 1, p, 40)) {
				printf("child: A page %zu is not as at its fork\n", p);
				fflush(stdout);
				_exit(1);
			}
		_exit(0);
	}
	if (pthread_create(&thread, NULL, writer, NULL))
		wl_die("pthread_create");
	wl_ready();
	for (int k = 1; k <= phases; k++) {
		phase(k);
		latest(argv[1], seen, sizeof(seen));
		printf("phase %d\n", k);
		fflush(stdout);
		while (!strcmp(latest(argv[1], now, sizeof(now)), seen) && stat(go, &st))
			usleep(10000);
	}
	while (stat(go, &st))
		usleep(10000);
	stop = 1;
	pthread_join(thread, NULL);
	check();
	if (child > 0 && (waitpid(child, &status, 0) != child || status))
		wl_fail("the forked child (status %#x)", status);
	return wl_finish();
}
