/*
 * Blocking system calls: the workload is checkpointed while blocked in one, and after restore
 * the call must carry on as if nothing happened: no EINTR, the normal result, the full wait.
 *
 * usage: blocking MODE
 *   nanosleep        nanosleep(3 s, &rem) as a raw syscall: returns 0 after >= 3 s
 *   clock_nanosleep  clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, now + 3 s): returns 0 late
 *   futex            a thread in FUTEX_WAIT without timeout; the leader wakes it after 3 s: the
 *                    wake finds exactly that waiter and the waiter returns 0 seeing the new value
 *   poll             poll(stdin, POLLIN, 60 s) on a terminal: returns 1 with POLLIN once the test
 *                    writes LINE (after restore, into the new terminal), then reads it
 *   read             read(stdin) on a terminal: returns LINE once the test writes it
 */
#include "wl.h"

#include <linux/futex.h>
#include <poll.h>

#define LINE "hpccr says hello\n"

static void sleep_nanosleep(void)
{
	struct timespec req = {3, 0}, rem = {-1, -1};
	double start;
	long ret;

	wl_ready();
	start = wl_now();
	ret = syscall(SYS_nanosleep, &req, &rem);

	WL_CHECK(ret == 0, "nanosleep returned %ld errno %d", ret, ret ? errno : 0);
	/* The kernel writes rem whenever the sleep is interrupted, even when it is then restarted
	 * transparently (a ptrace stop does that): it may only hold a time left, 0 to 3 s. */
	WL_CHECK((rem.tv_sec == -1 && rem.tv_nsec == -1) ||
		 (rem.tv_sec >= 0 && rem.tv_nsec >= 0 && rem.tv_nsec < 1000000000L &&
		  rem.tv_sec * 1000000000L + rem.tv_nsec <= 3000000000L),
		 "nanosleep wrote rem %ld.%09ld", (long)rem.tv_sec, rem.tv_nsec);
	WL_CHECK(wl_now() - start >= 3.0, "nanosleep slept only %.3f s", wl_now() - start);
}

static void sleep_clock_nanosleep(void)
{
	struct timespec deadline, now;
	long ret;

	wl_ready();
	clock_gettime(CLOCK_MONOTONIC, &deadline);
	deadline.tv_sec += 3;
	ret = syscall(SYS_clock_nanosleep, CLOCK_MONOTONIC, TIMER_ABSTIME, &deadline, NULL);
	clock_gettime(CLOCK_MONOTONIC, &now);
	WL_CHECK(ret == 0, "clock_nanosleep returned %ld errno %d", ret, ret ? errno : 0);
	WL_CHECK(now.tv_sec > deadline.tv_sec ||
		 (now.tv_sec == deadline.tv_sec && now.tv_nsec >= deadline.tv_nsec),
		 "clock_nanosleep returned before its deadline");
}

static uint32_t futex_word;
static long futex_ret = 1;
static int futex_errno;
static uint32_t futex_seen;
static pid_t waiter_tid;

static void *futex_waiter(void *arg)
{
	__atomic_store_n(&waiter_tid, wl_gettid(), __ATOMIC_SEQ_CST);
	futex_ret = syscall(SYS_futex, &futex_word, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
	futex_errno = errno;
	futex_seen = __atomic_load_n(&futex_word, __ATOMIC_SEQ_CST);
	return NULL;
}

/* True once thread tid is blocked in system call nr (first field of /proc/.../syscall). */
static int blocked_in(pid_t tid, int nr)
{
	char path[64];
	int cur = -1;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/self/task/%d/syscall", tid);
	f = fopen(path, "r");
	if (!f)
		return 0;
	if (fscanf(f, "%d", &cur) != 1)
		cur = -1;
	fclose(f);
	return cur == nr;
}

static void wait_futex(void)
{
	pthread_t thread;
	double start = wl_now();
	long woken;

	if (pthread_create(&thread, NULL, futex_waiter, NULL))
		wl_die("pthread_create");
	while (!__atomic_load_n(&waiter_tid, __ATOMIC_SEQ_CST) ||
	       !blocked_in(waiter_tid, SYS_futex)) {
		if (wl_now() - start > 10)
			wl_die("the waiter never blocked in futex");
		usleep(1000);
	}
	wl_ready();
	wl_sleep(WL_WINDOW_S);
	__atomic_store_n(&futex_word, 1, __ATOMIC_SEQ_CST);
	woken = syscall(SYS_futex, &futex_word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
	pthread_join(thread, NULL);
	WL_CHECK(woken == 1, "FUTEX_WAKE woke %ld waiters, not 1", woken);
	WL_CHECK(futex_ret == 0, "FUTEX_WAIT returned %ld errno %d", futex_ret,
		 futex_ret ? futex_errno : 0);
	WL_CHECK(futex_seen == 1, "FUTEX_WAIT returned before the wake");
}

static void read_line(void)
{
	char buf[256];
	ssize_t n = read(0, buf, sizeof(buf) - 1);

	if (n < 0) {
		wl_fail("read returned -1 errno %d (%s)", errno, strerror(errno));
		return;
	}
	buf[n] = 0;
	WL_CHECK(!strcmp(buf, LINE), "read returned %zd bytes \"%.*s\"", n, (int)strcspn(buf, "\n"),
		 buf);
}

static void poll_tty(void)
{
	struct pollfd pfd = {.fd = 0, .events = POLLIN};
	int ret;

	wl_ready();
	ret = poll(&pfd, 1, 60000);

	if (ret < 0)
		wl_fail("poll returned -1 errno %d (%s)", errno, strerror(errno));
	else
		WL_CHECK(ret == 1 && pfd.revents == POLLIN, "poll returned %d revents %#x", ret,
			 pfd.revents);
	read_line();
}

static void read_tty(void)
{
	wl_ready();
	read_line();
}

int main(int argc, char **argv)
{
	static const struct {
		const char *name;
		int tty;
		void (*run)(void);	/* sets up, announces READY, blocks, checks */
	} modes[] = {
		{"nanosleep", 0, sleep_nanosleep},
		{"clock_nanosleep", 0, sleep_clock_nanosleep},
		{"futex", 0, wait_futex},
		{"poll", 1, poll_tty},
		{"read", 1, read_tty},
	};

	for (size_t i = 0; argc == 2 && i < sizeof(modes) / sizeof(modes[0]); i++) {
		if (strcmp(argv[1], modes[i].name))
			continue;
		if (modes[i].tty && !isatty(0))
			wl_die("stdin is not a terminal");
		modes[i].run();
		return wl_finish();
	}
	fprintf(stderr, "usage: blocking nanosleep|clock_nanosleep|futex|poll|read\n");
	return 2;
}
