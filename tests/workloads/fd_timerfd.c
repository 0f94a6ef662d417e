/*
 * timerfd: clock, flags, interval, remaining time and pending expirations are kept.
 *
 * - periodic: CLOCK_MONOTONIC, every 50 ms, never read before the checkpoint: after it, its
 *   interval is exactly 50 ms, it has expirations pending and it keeps firing
 * - expired: CLOCK_MONOTONIC one-shot of 1 ms, TFD_NONBLOCK, expired before READY and not read:
 *   exactly one expiration pending, then disarmed
 * - later: CLOCK_MONOTONIC one-shot in 600 s: still armed, no more than that left
 * - wall: CLOCK_REALTIME absolute one-shot an hour ahead (TFD_TIMER_ABSTIME): the same wall-clock
 *   expiry (within 0.5 s)
 */
#include "wl.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/timerfd.h>

#define PERIOD_NS 50000000L
#define LATER_S 600
#define WALL_AHEAD_S 3600

static double seconds(struct timespec ts)
{
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int make(int clock, int flags, int settime, time_t sec, long nsec, long interval_ns)
{
	struct itimerspec its = { .it_interval = { 0, interval_ns }, .it_value = { sec, nsec } };
	int fd = timerfd_create(clock, flags);

	if (fd < 0 || timerfd_settime(fd, settime, &its, NULL))
		wl_die("timerfd");
	return fd;
}

int main(void)
{
	struct itimerspec its;
	struct timespec now;
	uint64_t ticks = 0;
	int periodic, expired, later, wall;
	double started = wl_now(), expiry;
	struct pollfd p;

	periodic = make(CLOCK_MONOTONIC, 0, 0, 0, PERIOD_NS, PERIOD_NS);
	expired = make(CLOCK_MONOTONIC, TFD_NONBLOCK, 0, 0, 1000000, 0);
	later = make(CLOCK_MONOTONIC, 0, 0, LATER_S, 0, 0);
	clock_gettime(CLOCK_REALTIME, &now);
	now.tv_sec += WALL_AHEAD_S;
	expiry = seconds(now);
	wall = make(CLOCK_REALTIME, 0, TFD_TIMER_ABSTIME, now.tv_sec, now.tv_nsec, 0);
	wl_sleep(0.01);
	wl_ready();

	wl_sleep(WL_WINDOW_S);

	WL_CHECK(!timerfd_gettime(periodic, &its) && its.it_interval.tv_sec == 0 &&
		 its.it_interval.tv_nsec == PERIOD_NS, "the periodic timer's interval is %.9f s",
		 seconds(its.it_interval));
	WL_CHECK(read(periodic, &ticks, 8) == 8 && ticks >= 1, "no pending periodic expiration");
	for (int i = 0; i < 3; i++) {
		p = (struct pollfd){ .fd = periodic, .events = POLLIN };
		WL_CHECK(poll(&p, 1, 1000) == 1 && read(periodic, &ticks, 8) == 8 && ticks >= 1,
			 "the periodic timer stopped firing");
	}

	WL_CHECK(fcntl(expired, F_GETFL) & O_NONBLOCK, "the expired timer became blocking");
	ticks = 0;
	WL_CHECK(read(expired, &ticks, 8) == 8 && ticks == 1,
		 "the expired timer had %llu expirations pending, not 1",
		 (unsigned long long)ticks);
	WL_CHECK(read(expired, &ticks, 8) == -1 && errno == EAGAIN,
		 "the expired timer fired again");
	WL_CHECK(!timerfd_gettime(expired, &its) && !its.it_value.tv_sec && !its.it_value.tv_nsec,
		 "the expired timer is armed again");

	WL_CHECK(!timerfd_gettime(later, &its) && (its.it_value.tv_sec || its.it_value.tv_nsec),
		 "the 600 s timer is disarmed");
	WL_CHECK(seconds(its.it_value) <= LATER_S &&
		 seconds(its.it_value) >= LATER_S - (wl_now() - started) - 0.5,
		 "the 600 s timer has %.3f s left after %.3f s", seconds(its.it_value),
		 wl_now() - started);

	WL_CHECK(!timerfd_gettime(wall, &its), "timerfd_gettime: %s", strerror(errno));
	clock_gettime(CLOCK_REALTIME, &now);
	WL_CHECK(its.it_value.tv_sec >= 0 && seconds(now) + seconds(its.it_value) > expiry - 0.5 &&
		 seconds(now) + seconds(its.it_value) < expiry + 0.5,
		 "the wall-clock timer expires at %.3f, not %.3f",
		 seconds(now) + seconds(its.it_value), expiry);
	return wl_finish();
}
