/*
 * Interval timers: ITIMER_REAL (every 50 ms) and ITIMER_VIRTUAL (every 20 ms of user CPU time)
 * keep firing across the checkpoint.  After the window getitimer shows both armed with their
 * intervals, and the counts of SIGALRM and SIGVTALRM keep growing (the virtual one while the
 * workload spins in user space).
 *
 * With the argument "fired", SIGALRM is blocked until it is pending before the checkpoint: the
 * real timer has then fired and shows nothing left, and only taking its signal re-arms it.
 */
#include "wl.h"

#include <signal.h>
#include <sys/time.h>

#define REAL_US 50000
#define VIRTUAL_US 20000

static volatile int alarms, vtalarms;

static void on_alarm(int signo)
{
	if (signo == SIGALRM)
		alarms++;
	else
		vtalarms++;
}

/* Wait (spinning, so that user CPU time passes) until *count grows by n; 0 if it does not. */
static int grows(volatile int *count, int n, double timeout)
{
	int start = *count;
	double deadline = wl_now() + timeout;

	while (*count < start + n)
		if (wl_now() > deadline)
			return 0;
	return 1;
}

static void arm(int which, long us)
{
	struct itimerval it = {{0, us}, {0, us}};

	if (setitimer(which, &it, NULL))
		wl_die("setitimer");
}

static void check_armed(int which, const char *name, long us)
{
	struct itimerval it;

	getitimer(which, &it);
	WL_CHECK(it.it_interval.tv_sec == 0 && it.it_interval.tv_usec == us,
		 "%s interval is %ld.%06ld s", name, (long)it.it_interval.tv_sec,
		 (long)it.it_interval.tv_usec);
	WL_CHECK(it.it_value.tv_sec == 0 && it.it_value.tv_usec > 0 && it.it_value.tv_usec <= us,
		 "%s is not armed: %ld.%06ld s left", name, (long)it.it_value.tv_sec,
		 (long)it.it_value.tv_usec);
}

int main(int argc, char **argv)
{
	int fired = argc > 1 && !strcmp(argv[1], "fired");
	sigset_t alrm, pending;

	struct sigaction sa = {.sa_handler = on_alarm, .sa_flags = SA_RESTART};

	sigemptyset(&sa.sa_mask);
	sigaction(SIGALRM, &sa, NULL);
	sigaction(SIGVTALRM, &sa, NULL);
	arm(ITIMER_REAL, REAL_US);
	arm(ITIMER_VIRTUAL, VIRTUAL_US);
	if (!grows(&alarms, 2, 5) || !grows(&vtalarms, 2, 5))
		wl_die("the timers do not fire");
	sigemptyset(&alrm);
	sigaddset(&alrm, SIGALRM);
	if (fired) {
		sigprocmask(SIG_BLOCK, &alrm, NULL);
		do
			sigpending(&pending);
		while (!sigismember(&pending, SIGALRM));
	}
	wl_ready();

	wl_sleep(WL_WINDOW_S);
	if (fired) {
		sigpending(&pending);
		WL_CHECK(sigismember(&pending, SIGALRM), "the fired SIGALRM is no longer pending");
		sigprocmask(SIG_UNBLOCK, &alrm, NULL);
	}

	check_armed(ITIMER_REAL, "ITIMER_REAL", REAL_US);
	check_armed(ITIMER_VIRTUAL, "ITIMER_VIRTUAL", VIRTUAL_US);
	WL_CHECK(grows(&alarms, 10, 5), "SIGALRM stopped coming after %d", alarms);
	WL_CHECK(grows(&vtalarms, 10, 5), "SIGVTALRM stopped coming after %d", vtalarms);
	printf("ALARMS %d %d\n", alarms, vtalarms);
	return wl_finish();
}
