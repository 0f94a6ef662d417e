/*
 * Lazy restore: memory a job uses and changes before its pages are all back (restore --lazy).
 *
 * usage: lazy_memory
 *
 * Fills five private anonymous regions with its own data, prints READY and waits for SIGUSR1.
 * Then (restored lazily, the stream of its pages held back by the test) it prints
 * "MISSING <n> of <m>": the pages of region E not in memory yet (pagemap), and while they miss:
 * - reads region A through (its pages come on fault);
 * - moves region B with mremap before touching it (its pages must follow it);
 * - drops the second half of region C with MADV_DONTNEED before touching it (zeros from then);
 * - forks a child that checks region D and exits with the result (its pages come through a
 *   userfaultfd of its own);
 * prints "ACTED" and waits for SIGUSR2; then checks every region (B at its new place, its old
 * place unmapped, C's dropped half zeros) and ends with PASS or FAIL.
 */
#include "wl.h"

#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>

#define PAGE 4096UL
#define REGION (16UL << 20)
#define E_SIZE (64UL << 20)

static volatile sig_atomic_t got;

static void on_signal(int sig)
{
	got = sig;
}

static char *map(size_t len)
{
	char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		wl_die("mmap");
	/* small pages wherever THP is: a VMA that gets huge pages on a fault is restored eagerly */
	if (madvise(p, len, MADV_NOHUGEPAGE))
		wl_die("madvise");
	return p;
}

static void wait_for(int sig, const sigset_t *others)
{
	while (got != sig)
		sigsuspend(others);
	got = 0;
}

static size_t missing(const char *p, size_t len)
{
	uint64_t entry;
	size_t n = 0;
	FILE *f = fopen("/proc/self/pagemap", "rb");

	if (!f)
		wl_die("pagemap");
	for (size_t off = 0; off < len; off += PAGE) {
		if (fseek(f, (long)((uintptr_t)(p + off) / PAGE * 8), SEEK_SET) ||
		    fread(&entry, 8, 1, f) != 1)
			wl_die("pagemap read");
		n += !(entry >> 63);
	}
	fclose(f);
	return n;
}

static void check(const char *what, const char *p, size_t len, uint64_t seed)
{
	long at = wl_verify(p, len, seed);

	WL_CHECK(at < 0, "region %s differs at offset %ld", what, at);
}

int main(void)
{
	struct sigaction sa = { .sa_handler = on_signal };
	sigset_t blocked, others;
	char *a = map(REGION), *b = map(REGION), *c = map(REGION), *d = map(REGION);
	char *e = map(E_SIZE);
	char *spot = mmap(NULL, REGION, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	char *old_b = b;
	unsigned char vec;
	int status;
	pid_t child;

	if (spot == MAP_FAILED)
		wl_die("mmap spot");
	wl_fill(a, REGION, 11);
	wl_fill(b, REGION, 12);
	wl_fill(c, REGION, 13);
	wl_fill(d, REGION, 14);
	wl_fill(e, E_SIZE, 15);
	sigemptyset(&blocked);
	sigaddset(&blocked, SIGUSR1);
	sigaddset(&blocked, SIGUSR2);
	sigprocmask(SIG_BLOCK, &blocked, &others);
	sigaction(SIGUSR1, &sa, NULL);
	sigaction(SIGUSR2, &sa, NULL);
	wl_ready();
	wait_for(SIGUSR1, &others);

	printf("MISSING %zu of %zu\n", missing(e, E_SIZE), E_SIZE / PAGE);
	fflush(stdout);
	check("A", a, REGION, 11);
	b = mremap(b, REGION, REGION, MREMAP_MAYMOVE | MREMAP_FIXED, spot);
	if (b == MAP_FAILED)
		wl_die("mremap");
	if (madvise(c + REGION / 2, REGION / 2, MADV_DONTNEED))
		wl_die("madvise dontneed");
	child = fork();
	if (child < 0)
		wl_die("fork");
	if (child == 0)
		_exit(wl_verify(d, REGION, 14) < 0 ? 0 : 1);
	WL_CHECK(waitpid(child, &status, 0) == child && WIFEXITED(status) &&
		 WEXITSTATUS(status) == 0, "the child's region D differs (status %#x)", status);
	printf("ACTED\n");
	fflush(stdout);

	wait_for(SIGUSR2, &others);
	check("A", a, REGION, 11);
	check("B (moved)", b, REGION, 12);
	check("C (first half)", c, REGION / 2, 13);
	for (size_t i = REGION / 2; i < REGION; i += 8)
		WL_CHECK(*(uint64_t *)(c + i) == 0, "region C's dropped half is not zeros at %zu", i);
	check("D", d, REGION, 14);
	check("E", e, E_SIZE, 15);
	WL_CHECK(mincore(old_b, PAGE, &vec) == -1 && errno == ENOMEM,
		 "region B's old place is still mapped");
	return wl_finish();
}
