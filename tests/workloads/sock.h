/*
 * Helpers of the unix socket workloads (sock_*.c), on top of tree.h: records of known content,
 * sent and checked message by message.
 */
#ifndef SOCK_H
#define SOCK_H

#include "tree.h"

#include <fcntl.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/un.h>

/* Message `i` of stream `seed`: its size (1..4000 bytes) and content. */
static inline size_t sock_msg(uint64_t seed, int i, char *buf)
{
	uint64_t state = (seed * 1000 + i) | 1;
	size_t len = 1 + wl_rand(&state) % 4000;

	for (size_t k = 0; k < len; k++)
		buf[k] = (char)wl_rand(&state);
	return len;
}

static inline void sock_send(int fd, uint64_t seed, int i)
{
	char buf[4096];
	size_t len = sock_msg(seed, i, buf);

	if (send(fd, buf, len, 0) != (ssize_t)len)
		wl_die("send");
}

/* Receive message `i` of `seed` as one datagram (MSG_DONTWAIT: it must be queued already). */
static inline void sock_expect(int fd, uint64_t seed, int i, const char *who)
{
	char want[4096], got[8192];
	size_t len = sock_msg(seed, i, want);
	ssize_t n = recv(fd, got, sizeof(got), MSG_DONTWAIT);

	if (n < 0)
		wl_fail("%s: message %d missing: %s", who, i, strerror(errno));
	else
		WL_CHECK((size_t)n == len && !memcmp(got, want, len),
			 "%s: message %d has %zd bytes, not the %zu sent, or other content", who, i, n,
			 len);
}

/* Receive messages 0..n-1 of `seed` as one byte stream (they must be queued already),
 * not a byte more. */
static inline void sock_expect_stream(int fd, uint64_t seed, int n, const char *who)
{
	static char want[4096 * 16], got[4096 * 16];
	size_t total = 0, done = 0;

	for (int i = 0; i < n; i++)
		total += sock_msg(seed, i, want + total);
	while (done < total) {
		ssize_t r = recv(fd, got + done, total - done, MSG_DONTWAIT);

		if (r <= 0)
			break;
		done += r;
	}
	WL_CHECK(done == total && !memcmp(got, want, total),
		 "%s: %zu bytes queued, not the %zu sent, or other content", who, done, total);
}

/* Nothing more queued. */
static inline void sock_expect_empty(int fd, const char *who)
{
	char c;
	ssize_t n = recv(fd, &c, 1, MSG_DONTWAIT);

	WL_CHECK(n < 0 && errno == EAGAIN, "%s: more than what was sent is queued (%zd)", who, n);
}

/* The peer credentials of `fd` (SO_PEERCRED) name process `pid`, with this process's uid, gid. */
static inline void sock_expect_peer(int fd, pid_t pid, const char *what)
{
	struct ucred cred;
	socklen_t len = sizeof(cred);

	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len)) {
		wl_fail("%s: SO_PEERCRED: %s", what, strerror(errno));
		return;
	}
	WL_CHECK(cred.pid == pid, "%s: peer credentials name pid %d, not %d", what, cred.pid, pid);
	WL_CHECK(cred.uid == geteuid() && cred.gid == getegid(),
		 "%s: peer credentials uid %d gid %d", what, cred.uid, cred.gid);
}

/* The address of `path` (abstract: in the abstract namespace) and its length. */
static inline socklen_t sock_addr(struct sockaddr_un *sun, const char *path, int abstract)
{
	size_t len = strlen(path);

	if (len > sizeof(sun->sun_path) - 2) {
		errno = ENAMETOOLONG;
		wl_die(path);
	}
	memset(sun, 0, sizeof(*sun));
	sun->sun_family = AF_UNIX;
	memcpy(sun->sun_path + !!abstract, path, len);
	return offsetof(struct sockaddr_un, sun_path) + !!abstract + len;
}

#endif
