/*
 * Benchmark workload: one large anonymous mapping full of pseudo-random data.
 *
 * usage: workload SIZE_BYTES [PERCENT]
 *
 * Fills SIZE bytes of private anonymous memory, prints "READY <addr> <size> <checksum>" and then
 * sleeps in pause().  Every SIGUSR1 recomputes the checksum and prints "OK <checksum>" or
 * "BAD <expected> <got>"; every SIGUSR2 writes new data into PERCENT % of its pages, chosen at
 * random (bench/incremental.py), and prints "WROTE <pages>".  It keeps running until killed.
 * stdout should be a regular file.
 */
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static uint64_t *mem;
static size_t words;
static uint64_t expected;
static double percent;
static uint64_t seed = 0x9e3779b97f4a7c15ULL;

static uint64_t next(void)
{
	seed ^= seed >> 12;
	seed ^= seed << 25;
	seed ^= seed >> 27;
	return seed * 0x2545f4914f6cdd1dULL;
}

static uint64_t checksum(void)
{
	/* Four independent lanes so that the multiply latency does not bound the speed. */
	uint64_t h[4] = {0xcbf29ce484222325ULL, 1, 2, 3};

	for (size_t i = 0; i + 4 <= words; i += 4)
		for (int l = 0; l < 4; l++)
			h[l] = (h[l] ^ mem[i + l]) * 0x100000001b3ULL;
	return h[0] ^ (h[1] << 1) ^ (h[2] << 2) ^ (h[3] << 3);
}

static void on_usr1(int sig)
{
	char line[64];
	uint64_t got = checksum();
	int n;

	(void)sig;
	if (got == expected)
		n = snprintf(line, sizeof(line), "OK %016" PRIx64 "\n", got);
	else
		n = snprintf(line, sizeof(line), "BAD %016" PRIx64 " %016" PRIx64 "\n", expected, got);
	if (write(STDOUT_FILENO, line, n) != n)
		_exit(3);
}

static void on_usr2(int sig)
{
	size_t pages = words / 512, n = (size_t)(pages * percent / 100);
	char line[64];
	int len;

	(void)sig;
	for (size_t i = 0; i < n; i++) {
		uint64_t *page = mem + (next() % pages) * 512;

		for (int w = 0; w < 512; w++)
			page[w] = next();
	}
	expected = checksum();
	len = snprintf(line, sizeof(line), "WROTE %zu\n", n);
	if (write(STDOUT_FILENO, line, len) != len)
		_exit(3);
}

int main(int argc, char **argv)
{
	struct sigaction sa;
	size_t size;

	if (argc != 2 && argc != 3) {
		fprintf(stderr, "usage: %s SIZE_BYTES [PERCENT]\n", argv[0]);
		return 2;
	}
	size = strtoull(argv[1], NULL, 0) & ~(size_t)31;
	words = size / 8;
	mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	percent = argc == 3 ? atof(argv[2]) : 0;
	for (size_t i = 0; i < words; i++) /* xorshift64* */
		mem[i] = next();
	expected = checksum();

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGUSR1, &sa, NULL) != 0) {
		perror("sigaction");
		return 1;
	}
	sa.sa_handler = on_usr2;
	if (sigaction(SIGUSR2, &sa, NULL) != 0) {
		perror("sigaction");
		return 1;
	}
	printf("READY %p %zu %016" PRIx64 "\n", (void *)mem, size, expected);
	fflush(stdout);
	for (;;)
		pause();
}
