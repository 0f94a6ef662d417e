/*
 * A running job for the fault tests: it must survive any number of dumps interrupted at any
 * moment (hpccr SIGKILLed) exactly as if nothing had happened.
 *
 * usage: busy MIB PROGRESS_FILE
 *
 * - MIB MiB of PRNG data; the main thread keeps writing one word at a time, keeps their sum up
 *   to date, re-adds the whole buffer often, and writes its iteration count to PROGRESS_FILE
 *   (so that a test sees it advance);
 * - a second thread sleeps in short nanosleeps (a restartable call the freeze interrupts);
 * - both check on every iteration that their signal mask is still the one they set (SIGUSR2
 *   blocked, nothing else), and that calls interrupted by a freeze return as they should.
 * SIGTERM ends the run: a last full check, then PASS or FAIL.
 */
#include "wl.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>

static volatile sig_atomic_t stop;
static volatile uint64_t sleeper_rounds;
static sigset_t expected_mask;

static void on_term(int sig)
{
	(void)sig;
	stop = 1;
}

static void check_mask(const char *who)
{
	sigset_t now;

	pthread_sigmask(SIG_SETMASK, NULL, &now);
	for (int sig = 1; sig < 65; sig++)
		WL_CHECK(sigismember(&now, sig) == sigismember(&expected_mask, sig),
			 "%s: signal %d %s in the mask", who, sig,
			 sigismember(&now, sig) ? "added" : "missing");
}

static void *sleeper(void *arg)
{
	struct timespec ts = { 0, 1000000 };

	(void)arg;
	while (!stop) {
		WL_CHECK(nanosleep(&ts, NULL) == 0 || errno == EINTR, "nanosleep: %s",
			 strerror(errno));
		check_mask("sleeper");
		sleeper_rounds++;
	}
	return NULL;
}

static uint64_t sum_of(const uint64_t *words, size_t n)
{
	uint64_t sum = 0;

	for (size_t i = 0; i < n; i++)
		sum += words[i];
	return sum;
}

int main(int argc, char **argv)
{
	struct timespec ts = { 0, 100000 };
	struct sigaction sa = { .sa_handler = on_term };
	uint64_t *words, sum, x = 88172645463325252ULL;
	size_t n;
	pthread_t thread;
	char line[32];
	int fd;

	if (argc != 3)
		return 2;
	n = strtoul(argv[1], NULL, 0) << 17;  /* MiB in 8-byte words */
	words = mmap(NULL, n * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (words == MAP_FAILED)
		wl_die("mmap");
	for (size_t i = 0; i < n; i++) {
		x ^= x << 13, x ^= x >> 7, x ^= x << 17;
		words[i] = x;
	}
	sum = sum_of(words, n);
	fd = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0600);
	if (fd < 0)
		wl_die(argv[2]);
	sigemptyset(&expected_mask);
	sigaddset(&expected_mask, SIGUSR2);
	pthread_sigmask(SIG_SETMASK, &expected_mask, NULL);
	sigaction(SIGTERM, &sa, NULL);
	if (pthread_create(&thread, NULL, sleeper, NULL))
		wl_die("pthread_create");
	wl_ready();
	for (uint64_t round = 1; !stop; round++) {
		size_t i = (round * 2654435761ULL) % n;

		sum -= words[i];
		words[i] = round;
		sum += round;
		WL_CHECK(nanosleep(&ts, NULL) == 0 || errno == EINTR, "nanosleep: %s",
			 strerror(errno));
		check_mask("main");
		if (round % 64 == 0)
			WL_CHECK(sum_of(words, n) == sum, "sum differs at round %lu",
				 (unsigned long)round);
		snprintf(line, sizeof(line), "%020lu\n", (unsigned long)round);
		WL_CHECK(pwrite(fd, line, 21, 0) == 21, "progress: %s", strerror(errno));
	}
	pthread_join(thread, NULL);
	WL_CHECK(sum_of(words, n) == sum, "sum differs at the end");
	WL_CHECK(sleeper_rounds > 0, "the sleeper never ran");
	return wl_finish();
}
