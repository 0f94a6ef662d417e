/*
 * eventfd: the counter and the semaphore and non-blocking modes are kept.
 *
 * - sem: eventfd(7, EFD_SEMAPHORE), blocking: seven reads of 1 each, then nothing to read
 * - big: eventfd(0, EFD_NONBLOCK) holding 0x123456789 (more than eventfd()'s initial value can
 *   hold): one read returns it all, the next one fails with EAGAIN
 */
#include "wl.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>

#define SEM_COUNT 7
#define BIG_COUNT 0x123456789ULL

static int readable(int fd)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };

	return poll(&p, 1, 0) == 1 && (p.revents & POLLIN);
}

int main(void)
{
	eventfd_t value;
	int sem, big, i;

	sem = eventfd(SEM_COUNT, EFD_SEMAPHORE);
	big = eventfd(0, EFD_NONBLOCK);
	if (sem < 0 || big < 0 || eventfd_write(big, BIG_COUNT))
		wl_die("eventfd");
	wl_ready();

	wl_sleep(WL_WINDOW_S);

	WL_CHECK(!(fcntl(sem, F_GETFL) & O_NONBLOCK), "the semaphore became non-blocking");
	WL_CHECK(fcntl(big, F_GETFL) & O_NONBLOCK, "the big counter became blocking");
	for (i = 0; i < SEM_COUNT && readable(sem); i++) {
		value = 0;
		WL_CHECK(eventfd_read(sem, &value) == 0 && value == 1,
			 "semaphore read %d gave %llu, not 1", i, (unsigned long long)value);
	}
	WL_CHECK(i == SEM_COUNT, "the semaphore let %d reads through, not %d", i, SEM_COUNT);
	WL_CHECK(!readable(sem), "the semaphore still counts after %d reads", SEM_COUNT);
	value = 0;
	WL_CHECK(eventfd_read(big, &value) == 0 && value == BIG_COUNT,
		 "the big counter read %#llx, not %#llx", (unsigned long long)value, BIG_COUNT);
	WL_CHECK(eventfd_read(big, &value) == -1 && errno == EAGAIN,
		 "the big counter did not drop to zero");
	WL_CHECK(eventfd_write(sem, 2) == 0 && readable(sem), "the semaphore does not count up");
	return wl_finish();
}
