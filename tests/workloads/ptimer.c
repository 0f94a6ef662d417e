/*
 * POSIX timers (timer_create) of four kinds, and the signals they deliver.
 *
 * usage: ptimer
 *
 * - periodic: CLOCK_MONOTONIC, every 20 ms, SIGRTMIN with sival_int PERIODIC_VALUE to the process;
 * - oneshot: CLOCK_REALTIME, one-shot in ONESHOT_S seconds, SIGUSR1 (never due during the test;
 *   disarmed at the end);
 * - thread: CLOCK_MONOTONIC, every 20 ms, SIGRTMIN+1 with sival_int THREAD_VALUE to the second
 *   thread only (SIGEV_THREAD_ID);
 * - none: CLOCK_BOOTTIME, every second, SIGEV_NONE (nothing delivered, only armed).
 * The handlers count the signals and check their siginfo: si_code SI_TIMER, si_timerid the id of
 * the timer that sent it, si_value its sival_int, and the receiving thread.  After the window the
 * workload checks that each timer still answers to its id (timer_gettime) with the interval it
 * was given, that the one-shot timer has less left than before the window (time stands still
 * while checkpointed, so more than ONESHOT_S - 30 s), that both periodic timers go on delivering,
 * and that no signal came with a wrong siginfo.
 */
#include "wl.h"

#include <signal.h>

#define PERIOD_NS 20000000L
#define PERIODIC_VALUE 0x5eed
#define THREAD_VALUE 0x7ead
#define ONESHOT_S 1000

static timer_t periodic, oneshot, thread_timer, none;
static volatile long periodic_count, thread_count, wrong;
static volatile pid_t worker_tid;
static volatile int stop;

static void on_timer(int sig, siginfo_t *info, void *ctx)
{
	(void)ctx;
	if (info->si_code != SI_TIMER) {
		wrong++;
		return;
	}
	if (sig == SIGRTMIN) {
		if (info->si_timerid != (int)(long)periodic || info->si_value.sival_int != PERIODIC_VALUE)
			wrong++;
		periodic_count++;
	} else {
		if (info->si_timerid != (int)(long)thread_timer ||
		    info->si_value.sival_int != THREAD_VALUE || wl_gettid() != worker_tid)
			wrong++;
		thread_count++;
	}
}

static void *worker(void *arg)
{
	sigset_t set;

	(void)arg;
	sigemptyset(&set);
	sigaddset(&set, SIGRTMIN + 1);
	pthread_sigmask(SIG_UNBLOCK, &set, NULL);
	worker_tid = wl_gettid();
	while (!stop)
		wl_sleep(0.05);
	return NULL;
}

static timer_t make(clockid_t clock, int notify, int signo, int value, pid_t tid, double value_s,
		    long interval_ns)
{
	struct sigevent ev;
	struct itimerspec its = { { interval_ns / 1000000000L, interval_ns % 1000000000L },
				  { (time_t)value_s, (long)((value_s - (time_t)value_s) * 1e9) } };
	timer_t id;

	memset(&ev, 0, sizeof(ev));
	ev.sigev_notify = notify;
	ev.sigev_signo = signo;
	ev.sigev_value.sival_int = value;
	ev._sigev_un._tid = tid;
	if (timer_create(clock, &ev, &id))
		wl_die("timer_create");
	if (timer_settime(id, 0, &its, NULL))
		wl_die("timer_settime");
	return id;
}

static void check_interval(const char *name, timer_t id, long interval_ns)
{
	struct itimerspec its;

	if (timer_gettime(id, &its)) {
		wl_fail("timer %s (id %ld): timer_gettime: %s", name, (long)id, strerror(errno));
		return;
	}
	WL_CHECK(its.it_value.tv_sec || its.it_value.tv_nsec, "timer %s is disarmed", name);
	WL_CHECK(its.it_interval.tv_sec * 1000000000L + its.it_interval.tv_nsec == interval_ns,
		 "timer %s has interval %ld.%09ld", name, (long)its.it_interval.tv_sec,
		 its.it_interval.tv_nsec);
}

int main(void)
{
	struct sigaction sa;
	struct itimerspec its;
	sigset_t set;
	pthread_t thread;
	long periodic_before, thread_before;

	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_timer;
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	sigaction(SIGRTMIN, &sa, NULL);
	sigaction(SIGRTMIN + 1, &sa, NULL);
	/* SIGRTMIN+1 only in the worker, which unblocks it. */
	sigemptyset(&set);
	sigaddset(&set, SIGRTMIN + 1);
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	if (pthread_create(&thread, NULL, worker, NULL))
		wl_die("pthread_create");
	while (!worker_tid)
		wl_sleep(0.01);
	periodic = make(CLOCK_MONOTONIC, SIGEV_SIGNAL, SIGRTMIN, PERIODIC_VALUE, 0, 0.02, PERIOD_NS);
	oneshot = make(CLOCK_REALTIME, SIGEV_SIGNAL, SIGUSR1, 0, 0, ONESHOT_S, 0);
	thread_timer = make(CLOCK_MONOTONIC, SIGEV_THREAD_ID, SIGRTMIN + 1, THREAD_VALUE, worker_tid,
			    0.02, PERIOD_NS);
	none = make(CLOCK_BOOTTIME, SIGEV_NONE, 0, 0, 0, 1, 1000000000L);
	wl_sleep(0.2);
	wl_ready();
	wl_sleep(WL_WINDOW_S);

	check_interval("periodic", periodic, PERIOD_NS);
	check_interval("oneshot", oneshot, 0);
	check_interval("thread", thread_timer, PERIOD_NS);
	check_interval("none", none, 1000000000L);
	if (timer_gettime(oneshot, &its) == 0)
		WL_CHECK(its.it_value.tv_sec < ONESHOT_S && its.it_value.tv_sec > ONESHOT_S - 30,
			 "the one-shot timer has %ld s left", (long)its.it_value.tv_sec);
	periodic_before = periodic_count;
	thread_before = thread_count;
	wl_sleep(0.5);
	WL_CHECK(periodic_count - periodic_before >= 10, "the periodic timer fired %ld times in 0.5 s",
		 periodic_count - periodic_before);
	WL_CHECK(thread_count - thread_before >= 10, "the thread timer fired %ld times in 0.5 s",
		 thread_count - thread_before);
	WL_CHECK(!wrong, "%ld timer signals came with a wrong siginfo or to the wrong thread", wrong);
	memset(&its, 0, sizeof(its));
	if (timer_settime(oneshot, 0, &its, NULL) || timer_gettime(oneshot, &its))
		wl_fail("disarming the one-shot timer: %s", strerror(errno));
	WL_CHECK(!its.it_value.tv_sec && !its.it_value.tv_nsec, "the one-shot timer stays armed");
	stop = 1;
	pthread_join(thread, NULL);
	return wl_finish();
}
