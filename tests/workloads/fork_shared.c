/*
 * Memory a root shares with its forked children (copy-on-write since fork), as a forked worker
 * pool over one data set has it.
 *
 * usage: fork_shared [-n] CHILDREN MIB [GO]
 *
 * The root fills MIB of anonymous memory, page by page with a value of (page, 0), and forks
 * CHILDREN children.  Child k writes its own 16 pages of it with (page, k + 1) and fills a
 * region of its own (1 MiB, mapped after the fork).  Once they are forked the root writes its
 * first 32 pages anew with (page, 100): from then on these are no longer the children's pages.
 * After the window every process checks every page: its own writes, the root's late ones in
 * the root only, and (page, 0) everywhere else — so a child given the root's current pages
 * instead of those it shared, or its own pages lost, FAILs.  With GO, each process waits for
 * that file to exist before it checks (so that a test can look at the restored memory first).
 * With -n (nested: workers that fork helpers), child k forks a grandchild of its own once its
 * pages are written; the grandchild leads a process group of its own and writes the 16 pages
 * after its parent's with (page, 200 + k), sharing the rest with its parent.
 */
#include "tree.h"

#include <sys/mman.h>

#define PAGE 4096
#define OWN_PAGES 16
#define ROOT_LATE_PAGES 32
#define ROOT_GEN 100
#define GRANDCHILD_GEN 200

static uint64_t *data;
static size_t pages;
static int generation_of_child = -1; /* the writer of this process's own pages: -1 root */
static int grandchild; /* a child's child (-n) */
static uint64_t *own;
static const char *go;

static uint64_t value(size_t page, int gen)
{
	return page * 1000003u + (uint64_t)gen * 7919u + 1;
}

static void fill(uint64_t *at, size_t page, int gen)
{
	for (size_t i = 0; i < PAGE / sizeof(uint64_t); i++)
		at[i] = value(page, gen) ^ i;
}

static int holds(const uint64_t *at, size_t page, int gen)
{
	for (size_t i = 0; i < PAGE / sizeof(uint64_t); i++)
		if (at[i] != (value(page, gen) ^ i))
			return 0;
	return 1;
}

static size_t first_own_page(int child)
{
	return ROOT_LATE_PAGES + (size_t)child * OWN_PAGES * 2;
}

static int expected_gen(size_t page)
{
	if (generation_of_child < 0)
		return page < ROOT_LATE_PAGES ? ROOT_GEN : 0;
	size_t first = first_own_page(generation_of_child);
	if (page >= first && page < first + OWN_PAGES)
		return generation_of_child + 1;
	if (grandchild && page >= first + OWN_PAGES && page < first + 2 * OWN_PAGES)
		return GRANDCHILD_GEN + generation_of_child;
	return 0;
}

static void check_all(void)
{
	while (go && access(go, F_OK))
		wl_sleep(0.01);
	for (size_t page = 0; page < pages; page++) {
		int gen = expected_gen(page);

		if (!holds(data + page * (PAGE / sizeof(uint64_t)), page, gen)) {
			wl_fail("%s: page %zu does not hold generation %d", tree_name, page, gen);
			return;
		}
	}
	for (size_t page = 0; own && page < 256; page++)
		if (!holds(own + page * (PAGE / sizeof(uint64_t)), page, 50)) {
			wl_fail("%s: page %zu of its own region is wrong", tree_name, page);
			return;
		}
}

/* Child k's own child: leads a group of its own, writes its pages, checks them after the
 * window (-n). */
__attribute__((noreturn))
static void grandchild_main(int k)
{
	size_t first = first_own_page(k) + OWN_PAGES;

	grandchild = 1;
	if (setpgid(0, 0))
		wl_die("setpgid");
	for (size_t page = first; page < first + OWN_PAGES; page++)
		fill(data + page * (PAGE / sizeof(uint64_t)), page, GRANDCHILD_GEN + k);
	tree_ready();
	wl_sleep(WL_WINDOW_S);
	tree_check_place();
	check_all();
	tree_exit();
}

int main(int argc, char **argv)
{
	int children, nested = argc > 1 && !strcmp(argv[1], "-n");
	pid_t pids[64];
	char names[64][16], grandchild_names[64][24];

	argc -= nested;
	argv += nested;
	if (argc < 3 || argc > 4 || (children = atoi(argv[1])) < 1 || children > 32 ||
	    atoi(argv[2]) < 1) {
		fprintf(stderr, "usage: fork_shared [-n] CHILDREN MIB [GO]\n");
		return 2;
	}
	pages = (size_t)atoi(argv[2]) << 20 >> 12;
	go = argc == 4 ? argv[3] : NULL;
	if (first_own_page(children) > pages) {
		fprintf(stderr, "fork_shared: too little memory for %d children\n", children);
		return 2;
	}
	data = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (data == MAP_FAILED)
		wl_die("mmap");
	for (size_t page = 0; page < pages; page++)
		fill(data + page * (PAGE / sizeof(uint64_t)), page, 0);
	tree_start();
	for (int k = 0; k < children; k++) {
		snprintf(names[k], sizeof(names[k]), "child %d", k);
		pids[k] = tree_fork(names[k]);
		if (pids[k] == 0) {
			generation_of_child = k;
			for (size_t page = first_own_page(k); page < first_own_page(k) + OWN_PAGES; page++)
				fill(data + page * (PAGE / sizeof(uint64_t)), page, k + 1);
			own = mmap(NULL, 256 * PAGE, PROT_READ | PROT_WRITE,
				   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			if (own == MAP_FAILED)
				wl_die("mmap");
			for (size_t page = 0; page < 256; page++)
				fill(own + page * (PAGE / sizeof(uint64_t)), page, 50);
			pid_t helper = 0;
			if (nested) {
				snprintf(grandchild_names[k], sizeof(grandchild_names[k]),
					 "grandchild %d", k);
				helper = tree_fork(grandchild_names[k]);
				if (helper == 0)
					grandchild_main(k);
			}
			tree_ready();
			wl_sleep(WL_WINDOW_S);
			tree_check_place();
			check_all();
			if (helper)
				tree_reap(helper, grandchild_names[k]);
			tree_exit();
		}
	}
	/* The children keep what they had at their fork: the root's pages are its own from now. */
	for (size_t page = 0; page < ROOT_LATE_PAGES; page++)
		fill(data + page * (PAGE / sizeof(uint64_t)), page, ROOT_GEN);
	tree_wait_ready(nested ? 2 * children : children);
	wl_sleep(WL_WINDOW_S);
	tree_check_place();
	check_all();
	for (int k = 0; k < children; k++)
		tree_reap(pids[k], names[k]);
	return wl_finish();
}
