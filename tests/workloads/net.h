/*
 * Helpers of the TCP workloads (net_*.c), on top of wl.h: queues filled without blocking, and
 * the rest of two byte streams exchanged and checked.
 */
#ifndef NET_H
#define NET_H

#include "wl.h"

#include <poll.h>
#include <sys/socket.h>

/* Send `data` without blocking until the queues are full (or all of `total` is sent); returns
 * the bytes sent. */
static inline size_t net_fill(int fd, const char *data, size_t total)
{
	size_t sent = 0;

	while (sent < total) {
		ssize_t n = send(fd, data + sent, total - sent, MSG_DONTWAIT);

		if (n < 0 && errno == EAGAIN)
			break;
		if (n <= 0)
			wl_die("send");
		sent += n;
	}
	return sent;
}

/* Send the rest of `mine` from `sent` while receiving `total` bytes, which must be `theirs`. */
static inline void net_exchange(int fd, const char *mine, const char *theirs, size_t total,
				size_t sent, const char *who)
{
	char *buf = malloc(total);
	size_t got = 0;

	if (!buf)
		wl_die("malloc");
	while (got < total || sent < total) {
		struct pollfd p = { fd, (got < total ? POLLIN : 0) | (sent < total ? POLLOUT : 0), 0 };

		if (poll(&p, 1, 30000) != 1) {
			wl_fail("%s: stuck after %zu bytes received, %zu sent", who, got, sent);
			break;
		}
		if (p.revents & POLLOUT) {
			ssize_t n = send(fd, mine + sent, total - sent, MSG_DONTWAIT | MSG_NOSIGNAL);

			if (n > 0)
				sent += n;
		}
		if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
			ssize_t n = recv(fd, buf + got, total - got, MSG_DONTWAIT);

			if (n <= 0) {
				wl_fail("%s: receive after %zu bytes: %s", who, got,
					n ? strerror(errno) : "end of file");
				break;
			}
			got += n;
		}
	}
	WL_CHECK(got == total && !memcmp(buf, theirs, total),
		 "%s: the %zu bytes received differ from those sent", who, got);
	free(buf);
}

#endif
