/*
 * Memory: every kind of mapping keeps its content and protection.
 *
 * usage: memory DIR   (DIR holds the two files this workload maps)
 *
 * - 64 MiB of PRNG data in malloc'd memory, plus small blocks on the brk heap;
 * - a private anonymous mapping, half written, half never touched (must read as zeros);
 * - a MAP_PRIVATE file mapping with some pages written (copy-on-write: the file is unchanged,
 *   the unwritten pages still show the file);
 * - a region holding data but PROT_NONE at the time of the checkpoint;
 * - a MAP_SHARED file mapping written through (after restore it is still the file's page cache).
 * Prints "CSUM <hex>" before and after, "ADDR <hex>" of the 64 MiB buffer (for the test that
 * corrupts it on purpose), and after the checks grows the heap with sbrk and a large malloc.
 */
#include "wl.h"

#include <fcntl.h>
#include <sys/mman.h>

#define PAGE 4096UL
#define BIG (64UL << 20)
#define ANON (8UL << 20)
#define NSMALL 256
#define SMALL 1000
#define PRIV_PAGES 16
#define NONE_PAGES 4
#define SHARED_PAGES 4

static char *big, *anon, *priv, *none, *shared;
static char *small[NSMALL];
static int priv_fd, shared_fd;

static uint64_t fnv(uint64_t h, const void *buf, size_t len)
{
	const uint64_t *p = buf;

	for (size_t i = 0; i < len / 8; i++)
		h = (h ^ p[i]) * 0x100000001b3ULL;
	return h;
}

static uint64_t checksum(void)
{
	uint64_t h = 0xcbf29ce484222325ULL;

	for (int i = 0; i < NSMALL; i++)
		h = fnv(h, small[i], SMALL);
	h = fnv(h, big, BIG);
	h = fnv(h, anon, ANON);
	h = fnv(h, priv, PRIV_PAGES * PAGE);
	h = fnv(h, none, NONE_PAGES * PAGE);
	return fnv(h, shared, SHARED_PAGES * PAGE);
}

static int open_file(const char *dir, const char *name)
{
	char path[4096];
	int fd;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (fd < 0)
		wl_die(path);
	return fd;
}

static void *map(size_t len, int prot, int flags, int fd)
{
	void *p = mmap(NULL, len, prot, flags, fd, 0);

	if (p == MAP_FAILED)
		wl_die("mmap");
	return p;
}

static void setup(const char *dir)
{
	char page[PAGE];

	for (int i = 0; i < NSMALL; i++) {
		small[i] = malloc(SMALL);
		if (!small[i])
			wl_die("malloc small");
		wl_fill(small[i], SMALL, 1000 + i);
	}
	big = malloc(BIG);
	if (!big)
		wl_die("malloc big");
	wl_fill(big, BIG, 1);

	anon = map(ANON, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1);
	wl_fill(anon, ANON / 2, 2);

	/* The file holds seed 300+i in page i; the odd pages of the mapping are overwritten. */
	priv_fd = open_file(dir, "private.dat");
	for (unsigned long i = 0; i < PRIV_PAGES; i++) {
		wl_fill(page, PAGE, 300 + i);
		if (write(priv_fd, page, PAGE) != PAGE)
			wl_die("write private.dat");
	}
	priv = map(PRIV_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, priv_fd);
	for (unsigned long i = 1; i < PRIV_PAGES; i += 2)
		wl_fill(priv + i * PAGE, PAGE, 400 + i);

	none = map(NONE_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1);
	wl_fill(none, NONE_PAGES * PAGE, 5);

	shared_fd = open_file(dir, "shared.dat");
	if (ftruncate(shared_fd, SHARED_PAGES * PAGE))
		wl_die("ftruncate shared.dat");
	shared = map(SHARED_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, shared_fd);
	wl_fill(shared, SHARED_PAGES * PAGE, 6);
}

/* Protection of the mapping that starts at addr, as /proc/self/maps shows it ("rw-p"). */
static void protection(void *addr, char *perms)
{
	FILE *f = fopen("/proc/self/maps", "r");
	unsigned long start;
	char line[512], found[8];

	strcpy(perms, "none");
	if (!f)
		return;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "%lx-%*x %7s", &start, found) == 2 &&
		    start == (unsigned long)addr) {
			strcpy(perms, found);
			break;
		}
	fclose(f);
}

static void verify(void)
{
	char page[PAGE], perms[8];
	long off;

	for (int i = 0; i < NSMALL; i++)
		WL_CHECK(wl_verify(small[i], SMALL, 1000 + i) < 0, "heap block %d differs", i);
	off = wl_verify(big, BIG, 1);
	WL_CHECK(off < 0, "malloc'd buffer differs at offset %ld", off);
	off = wl_verify(anon, ANON / 2, 2);
	WL_CHECK(off < 0, "anonymous mapping differs at offset %ld", off);
	for (unsigned long i = ANON / 2; i < ANON; i += 8)
		if (*(uint64_t *)(anon + i)) {
			wl_fail("untouched anonymous page not zero at offset %lu", i);
			break;
		}
	for (unsigned long i = 0; i < PRIV_PAGES; i++) {
		WL_CHECK(wl_verify(priv + i * PAGE, PAGE, (i % 2 ? 400 : 300) + i) < 0,
			 "private file mapping page %lu differs", i);
		WL_CHECK(pread(priv_fd, page, PAGE, i * PAGE) == PAGE &&
			 wl_verify(page, PAGE, 300 + i) < 0,
			 "private.dat page %lu changed on disk", i);
	}

	protection(none, perms);
	WL_CHECK(!strcmp(perms, "---p"), "PROT_NONE region is %s", perms);
	if (mprotect(none, NONE_PAGES * PAGE, PROT_READ | PROT_WRITE))
		wl_fail("mprotect back: %s", strerror(errno));
	else
		WL_CHECK(wl_verify(none, NONE_PAGES * PAGE, 5) < 0, "PROT_NONE region data differs");

	WL_CHECK(wl_verify(shared, SHARED_PAGES * PAGE, 6) < 0, "shared file mapping differs");
	WL_CHECK(pread(shared_fd, page, PAGE, 0) == PAGE && wl_verify(page, PAGE, 6) < 0,
		 "shared.dat does not hold what was written through the mapping");
}

/* The shared mapping is still the file's pages: a write through it now reaches the file. */
static void write_through(void)
{
	char buf[8];

	memset(shared + PAGE, 0x5a, sizeof(buf));
	WL_CHECK(pread(shared_fd, buf, sizeof(buf), PAGE) == sizeof(buf) &&
		 !memcmp(buf, shared + PAGE, sizeof(buf)),
		 "shared mapping no longer writes through to shared.dat");
}

static void grow(void)
{
	size_t more = 16UL << 20;
	char *p = sbrk(more), *q;

	if (p == (void *)-1) {
		wl_fail("sbrk grow: %s", strerror(errno));
		return;
	}
	memset(p, 0x11, more);
	WL_CHECK(sbrk(0) == p + more, "brk did not move by %zu", more);
	q = malloc(128UL << 20);
	if (!q) {
		wl_fail("malloc 128 MiB failed");
		return;
	}
	memset(q, 0x22, 128UL << 20);
	WL_CHECK(p[more - 1] == 0x11 && q[(128UL << 20) - 1] == 0x22, "grown memory lost");
	free(q);
	for (int i = 0; i < 1000; i++)
		free(malloc(100 + i));
}

int main(int argc, char **argv)
{
	uint64_t before, after;
	void *brk_before;

	if (argc != 2) {
		fprintf(stderr, "usage: memory DIR\n");
		return 2;
	}
	setup(argv[1]);
	before = checksum();
	if (mprotect(none, NONE_PAGES * PAGE, PROT_NONE))
		wl_die("mprotect PROT_NONE");
	brk_before = sbrk(0);
	printf("ADDR %p\nCSUM %016llx\n", (void *)big, (unsigned long long)before);
	wl_ready();

	wl_sleep(WL_WINDOW_S);

	verify();
	after = checksum();
	printf("CSUM %016llx\n", (unsigned long long)after);
	WL_CHECK(after == before, "checksum %016llx became %016llx",
		 (unsigned long long)before, (unsigned long long)after);
	WL_CHECK(sbrk(0) == brk_before, "brk %p became %p", brk_before, sbrk(0));
	write_through();
	grow();
	return wl_finish();
}
