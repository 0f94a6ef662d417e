/*
 * The zdtm-style protocol shared by the workloads.
 *
 * A workload sets up the state under test, calls wl_ready() (prints "PID <pid>" and "READY"),
 * stays in that state for a few seconds (the test checkpoints and restores it meanwhile), checks
 * the state and returns wl_finish(): it prints "PID <getpid()>" again and "PASS", or
 * "FAIL <first failure>", and gives the exit status.
 */
#ifndef WL_H
#define WL_H

#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* The window the test has to checkpoint the workload after READY. */
#define WL_WINDOW_S 3.0

static pid_t wl_pid;
static char wl_failure[512];
static pthread_mutex_t wl_lock = PTHREAD_MUTEX_INITIALIZER;

static inline pid_t wl_gettid(void)
{
	return syscall(SYS_gettid);
}

/* Record a failure; only the first one is reported. */
__attribute__((format(printf, 1, 2)))
static inline void wl_fail(const char *fmt, ...)
{
	va_list ap;

	pthread_mutex_lock(&wl_lock);
	if (!wl_failure[0]) {
		va_start(ap, fmt);
		vsnprintf(wl_failure, sizeof(wl_failure), fmt, ap);
		va_end(ap);
	}
	pthread_mutex_unlock(&wl_lock);
}

#define WL_CHECK(cond, ...) do { if (!(cond)) wl_fail(__VA_ARGS__); } while (0)

/* Give up at once on a failed setup step: the workload cannot test anything. */
static inline void wl_die(const char *what)
{
	printf("FAIL setup: %s: %s\n", what, strerror(errno));
	fflush(stdout);
	exit(1);
}

static inline double wl_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Sleep until `seconds` from now have passed on CLOCK_MONOTONIC, whatever interrupts us. */
static inline void wl_sleep(double seconds)
{
	struct timespec deadline;

	clock_gettime(CLOCK_MONOTONIC, &deadline);
	deadline.tv_sec += (time_t)seconds;
	deadline.tv_nsec += (long)((seconds - (time_t)seconds) * 1e9);
	if (deadline.tv_nsec >= 1000000000L) {
		deadline.tv_sec++;
		deadline.tv_nsec -= 1000000000L;
	}
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &deadline, NULL) == EINTR)
		;
}

static inline void wl_ready(void)
{
	wl_pid = syscall(SYS_getpid);
	printf("PID %d\nREADY\n", wl_pid);
	fflush(stdout);
}

static inline int wl_finish(void)
{
	pid_t now = syscall(SYS_getpid);

	printf("PID %d\n", now);
	WL_CHECK(now == wl_pid, "pid %d became %d", wl_pid, now);
	if (wl_failure[0])
		printf("FAIL %s\n", wl_failure);
	else
		printf("PASS\n");
	fflush(stdout);
	return wl_failure[0] ? 1 : 0;
}

/* xorshift64*: the workloads' own reproducible data. */
static inline uint64_t wl_rand(uint64_t *state)
{
	uint64_t x = *state;

	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*state = x;
	return x * 0x2545F4914F6CDD1DULL;
}

static inline void wl_fill(void *buf, size_t len, uint64_t seed)
{
	uint64_t *p = buf, state = seed | 1;

	for (size_t i = 0; i < len / 8; i++)
		p[i] = wl_rand(&state);
}

/* Offset of the first word that differs from wl_fill(seed), or -1 when all match. */
static inline long wl_verify(const void *buf, size_t len, uint64_t seed)
{
	const uint64_t *p = buf;
	uint64_t state = seed | 1;

	for (size_t i = 0; i < len / 8; i++)
		if (p[i] != wl_rand(&state))
			return (long)(i * 8);
	return -1;
}

#endif
