/*
 * epoll: every watch comes back with its descriptor number, events and data.
 *
 * usage: fd_epoll [stale]
 *
 * The set watches an eventfd holding 3 (EPOLLIN), the read end of a pipe holding "hello"
 * (EPOLLIN), its write end (EPOLLOUT) and an empty eventfd (EPOLLIN, never ready), each with
 * its own 64-bit data.  After the window a zero-timeout epoll_wait reports exactly the three
 * ready ones with their data; the watches are still keyed by their numbers (EPOLL_CTL_DEL by
 * number works, and then the eventfd is no longer reported); the data is intact.
 *
 * "stale": the set also watches the readable eventfd under two more numbers: one closed since
 * (the file stays open as the eventfd), one that holds the idle eventfd now.  Both watches are
 * reported with their data after the window, and neither number can be deleted from the set
 * any more (the kernel keys a watch by file and number: ENOENT), as before a checkpoint.
 */
#include "wl.h"

#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>

#define EVENT_DATA 0x1122334455667788ULL
#define READ_DATA 0xdeadbeefcafef00dULL
#define WRITE_DATA 0x4242ULL
#define IDLE_DATA 77ULL
#define STALE_DATA 0x5151ULL
#define REPLACED_DATA 0x6161ULL
#define CLOSED_FD 40
#define REPLACED_FD 41

static void watch(int ep, int fd, uint32_t events, uint64_t data)
{
	struct epoll_event ev = { .events = events, .data.u64 = data };

	if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev))
		wl_die("epoll_ctl");
}

/* Index in evs of the event with `data`, or -1. */
static int find(const struct epoll_event *evs, int n, uint64_t data)
{
	for (int i = 0; i < n; i++)
		if (evs[i].data.u64 == data)
			return i;
	return -1;
}

static void expect(const struct epoll_event *evs, int n, uint64_t data, uint32_t events)
{
	int i = find(evs, n, data);

	WL_CHECK(i >= 0, "no event with data %#llx", (unsigned long long)data);
	WL_CHECK(i < 0 || evs[i].events == events, "data %#llx came with events %#x, not %#x",
		 (unsigned long long)data, i < 0 ? 0 : evs[i].events, events);
}

int main(int argc, char **argv)
{
	int stale = argc > 1 && !strcmp(argv[1], "stale");
	struct epoll_event evs[8];
	int ep, efd, idle, p[2], n;
	eventfd_t count = 0;
	char buf[8] = "";

	ep = epoll_create1(0);
	efd = eventfd(3, 0);
	idle = eventfd(0, 0);
	if (ep < 0 || efd < 0 || idle < 0 || pipe(p) || write(p[1], "hello", 5) != 5)
		wl_die("setup");
	watch(ep, efd, EPOLLIN, EVENT_DATA);
	watch(ep, p[0], EPOLLIN, READ_DATA);
	watch(ep, p[1], EPOLLOUT, WRITE_DATA);
	watch(ep, idle, EPOLLIN, IDLE_DATA);
	if (stale) {
		if (dup2(efd, CLOSED_FD) < 0 || dup2(efd, REPLACED_FD) < 0)
			wl_die("dup2");
		watch(ep, CLOSED_FD, EPOLLIN, STALE_DATA);
		watch(ep, REPLACED_FD, EPOLLIN, REPLACED_DATA);
		if (close(CLOSED_FD) || dup2(idle, REPLACED_FD) < 0)
			wl_die("closing and replacing");
	}
	wl_ready();

	wl_sleep(WL_WINDOW_S);

	n = epoll_wait(ep, evs, 8, 0);
	WL_CHECK(n == 3 + 2 * stale, "epoll_wait reported %d events, not %d", n, 3 + 2 * stale);
	expect(evs, n, EVENT_DATA, EPOLLIN);
	expect(evs, n, READ_DATA, EPOLLIN);
	expect(evs, n, WRITE_DATA, EPOLLOUT);
	if (stale) {
		expect(evs, n, STALE_DATA, EPOLLIN);
		expect(evs, n, REPLACED_DATA, EPOLLIN);
		WL_CHECK(fcntl(CLOSED_FD, F_GETFD) < 0 && errno == EBADF, "fd %d is open", CLOSED_FD);
		WL_CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, REPLACED_FD, NULL) < 0 && errno == ENOENT,
			 "fd %d (the idle eventfd now) is watched", REPLACED_FD);
	}
	WL_CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, efd, NULL) == 0,
		 "the eventfd is not watched as fd %d: %s", efd, strerror(errno));
	n = epoll_wait(ep, evs, 8, 0);
	WL_CHECK(n == 2 + 2 * stale && find(evs, n, EVENT_DATA) < 0,
		 "after EPOLL_CTL_DEL epoll_wait reported %d events", n);
	WL_CHECK(eventfd_read(efd, &count) == 0 && count == 3, "the eventfd holds %llu, not 3",
		 (unsigned long long)count);
	WL_CHECK(read(p[0], buf, sizeof(buf)) == 5 && !memcmp(buf, "hello", 5),
		 "the pipe lost its data");
	return wl_finish();
}
