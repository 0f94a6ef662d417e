/*
 * A big mapping cut into many pieces, as guard pages, JIT heaps and language runtimes leave it.
 *
 * usage: mem_pieces [SECONDS]
 *
 * 512 MiB of anonymous memory filled with PRNG data, then about 500 random single pages made
 * PROT_NONE and about 100 others PROT_READ (about 1200 VMAs).  After the window the workload
 * checks, from /proc/self/maps, that every page of the region has exactly the protection it
 * gave it, then makes the whole region readable again and checks every byte.
 */
#include "wl.h"

#include <sys/mman.h>

#define PAGE 4096UL
#define SIZE (512UL << 20)
#define PAGES (SIZE / PAGE)
#define NONE_PAGES 500
#define READ_PAGES 100
#define SEED 0x6a09e667f3bcc908ULL

static char *region;
static unsigned char prot[PAGES]; /* the protection of each page, as set here */

static const char *perms(int p)
{
	return p == PROT_NONE ? "---" : p == PROT_READ ? "r--" : "rw-";
}

/* Every page of the region as /proc/self/maps shows it has the protection in prot[]. */
static void check_maps(void)
{
	unsigned long lo = (unsigned long)region, hi = lo + SIZE, covered = 0;
	char line[512], want[4];
	FILE *maps = fopen("/proc/self/maps", "r");

	if (!maps)
		wl_die("/proc/self/maps");
	while (fgets(line, sizeof(line), maps)) {
		unsigned long start, end;
		char have[5];

		if (sscanf(line, "%lx-%lx %4s", &start, &end, have) != 3 || end <= lo || start >= hi)
			continue;
		for (unsigned long a = start < lo ? lo : start; a < end && a < hi; a += PAGE) {
			memcpy(want, perms(prot[(a - lo) / PAGE]), 4);
			WL_CHECK(!strncmp(have, want, 3), "page %#lx is %.3s, not %s", a, have, want);
			covered++;
		}
	}
	fclose(maps);
	WL_CHECK(covered == PAGES, "maps show %lu of the region's %lu pages", covered, PAGES);
}

int main(int argc, char **argv)
{
	double window = argc > 1 ? atof(argv[1]) : WL_WINDOW_S;
	uint64_t state = SEED;
	int pieces = 0;

	region = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (region == MAP_FAILED)
		wl_die("mmap");
	wl_fill(region, SIZE, SEED);
	memset(prot, PROT_READ | PROT_WRITE, sizeof(prot));
	while (pieces < NONE_PAGES + READ_PAGES) {
		unsigned long page = wl_rand(&state) % PAGES;
		int p = pieces < NONE_PAGES ? PROT_NONE : PROT_READ;

		if (prot[page] != (PROT_READ | PROT_WRITE))
			continue;
		if (mprotect(region + page * PAGE, PAGE, p))
			wl_die("mprotect");
		prot[page] = p;
		pieces++;
	}
	check_maps();
	if (wl_failure[0]) {
		printf("FAIL setup: %s\n", wl_failure);
		return 1;
	}
	wl_ready();
	wl_sleep(window);
	check_maps();
	if (mprotect(region, SIZE, PROT_READ | PROT_WRITE))
		wl_die("mprotect");
	long bad = wl_verify(region, SIZE, SEED);

	WL_CHECK(bad < 0, "the region differs at offset %ld", bad);
	return wl_finish();
}
