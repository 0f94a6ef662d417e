/*
 * Unix sockets that are neither connected nor listening: made and never bound, or bound to a
 * name and left so (stream, dgram and seqpacket each); and a dgram socket connected to the
 * bound dgram one, which is not connected back.
 *
 * usage: sock_unconnected DIR   (DIR holds the sockets bound to a path)
 *
 * After the window, each socket must have its type, its name (none, a path with its socket
 * file and mode, an abstract name) and its O_NONBLOCK flag, and still work: the bound stream
 * and seqpacket sockets listen and the unbound ones of their type connect to them and talk;
 * the unbound dgram socket sends to the bound one, and so does the one connected to it, whose
 * peer is still that one.
 */
#include "wl.h"

#include <fcntl.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#define TYPES 3

static const int types[TYPES] = { SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET };
static const char *names[TYPES] = { "stream", "dgram", "seqpacket" };
static int unbound[TYPES], bound[TYPES];
static int toward; /* a dgram socket connected to the bound one, which is not connected back */
static struct sockaddr_un addr[TYPES];
static socklen_t addrlen[TYPES];

static void check_socket(int fd, int type, const struct sockaddr_un *want, socklen_t wantlen,
			 int nonblock, const char *who)
{
	struct sockaddr_un have;
	socklen_t len = sizeof(have), typelen = sizeof(int);
	int have_type = -1, flags = fcntl(fd, F_GETFL);

	WL_CHECK(!getsockopt(fd, SOL_SOCKET, SO_TYPE, &have_type, &typelen) && have_type == type,
		 "%s: type %d, not %d", who, have_type, type);
	WL_CHECK(!getsockname(fd, (struct sockaddr *)&have, &len), "%s: getsockname: %s", who,
		 strerror(errno));
	WL_CHECK(len == wantlen && !memcmp(&have, want, len),
		 "%s: name of %u bytes '%s', not %u bytes '%s'", who, len,
		 len > sizeof(sa_family_t) ? have.sun_path : "", wantlen,
		 wantlen > sizeof(sa_family_t) ? want->sun_path : "");
	WL_CHECK(flags >= 0 && !!(flags & O_NONBLOCK) == nonblock, "%s: O_NONBLOCK %s", who,
		 nonblock ? "lost" : "gained");
}

static void talk(int a, int b, const char *who)
{
	char buf[64];

	WL_CHECK(send(a, who, strlen(who), 0) == (ssize_t)strlen(who), "%s: send: %s", who,
		 strerror(errno));
	WL_CHECK(recv(b, buf, sizeof(buf), 0) == (ssize_t)strlen(who) &&
		 !memcmp(buf, who, strlen(who)), "%s: message lost", who);
}

int main(int argc, char **argv)
{
	struct sockaddr_un none = { .sun_family = AF_UNIX };
	struct stat st;

	if (argc < 2) {
		fprintf(stderr, "usage: %s DIR\n", argv[0]);
		return 2;
	}
	for (int i = 0; i < TYPES; i++) {
		/* the unbound dgram socket is non-blocking: its flags must come back too */
		unbound[i] = socket(AF_UNIX, types[i] | (i == 1 ? SOCK_NONBLOCK : 0), 0);
		bound[i] = socket(AF_UNIX, types[i], 0);
		if (unbound[i] < 0 || bound[i] < 0)
			wl_die("socket");
		addr[i].sun_family = AF_UNIX;
		if (types[i] == SOCK_SEQPACKET) { /* an abstract name */
			int n = snprintf(addr[i].sun_path + 1, sizeof(addr[i].sun_path) - 1,
					 "hpccr-unconnected-%d", getpid());
			addrlen[i] = offsetof(struct sockaddr_un, sun_path) + 1 + n;
		} else {
			snprintf(addr[i].sun_path, sizeof(addr[i].sun_path), "%s/%s.sock", argv[1],
				 names[i]);
			addrlen[i] = offsetof(struct sockaddr_un, sun_path)
				     + strlen(addr[i].sun_path) + 1;
		}
		if (bind(bound[i], (struct sockaddr *)&addr[i], addrlen[i]))
			wl_die("bind");
	}
	if (chmod(addr[0].sun_path, 0640))
		wl_die("chmod");
	toward = socket(AF_UNIX, SOCK_DGRAM, 0);
	if (toward < 0 || connect(toward, (struct sockaddr *)&addr[1], addrlen[1]))
		wl_die("connect");

	wl_ready();
	wl_sleep(WL_WINDOW_S);

	for (int i = 0; i < TYPES; i++) {
		char who[64];

		snprintf(who, sizeof(who), "unbound %s", names[i]);
		check_socket(unbound[i], types[i], &none, sizeof(sa_family_t), i == 1, who);
		snprintf(who, sizeof(who), "bound %s", names[i]);
		check_socket(bound[i], types[i], &addr[i], addrlen[i], 0, who);
	}
	WL_CHECK(!stat(addr[0].sun_path, &st) && S_ISSOCK(st.st_mode)
		 && (st.st_mode & 07777) == 0640, "%s: not a socket file of mode 0640",
		 addr[0].sun_path);
	WL_CHECK(!stat(addr[1].sun_path, &st) && S_ISSOCK(st.st_mode), "%s: no socket file",
		 addr[1].sun_path);

	for (int i = 0; i < TYPES; i++) {
		if (types[i] == SOCK_DGRAM) {
			struct sockaddr_un peer;
			socklen_t len = sizeof(peer);
			char buf[64];

			WL_CHECK(sendto(unbound[i], "dgram", 5, 0, (struct sockaddr *)&addr[i],
					addrlen[i]) == 5, "dgram: sendto: %s", strerror(errno));
			WL_CHECK(recv(bound[i], buf, sizeof(buf), MSG_DONTWAIT) == 5
				 && !memcmp(buf, "dgram", 5), "dgram: datagram lost");
			WL_CHECK(!getpeername(toward, (struct sockaddr *)&peer, &len)
				 && len == addrlen[i] && !memcmp(&peer, &addr[i], len),
				 "dgram: the connected socket lost its peer");
			WL_CHECK(send(toward, "toward", 6, 0) == 6
				 && recv(bound[i], buf, sizeof(buf), MSG_DONTWAIT) == 6
				 && !memcmp(buf, "toward", 6), "dgram: datagram from the connected "
				 "socket lost");
			continue;
		}
		int accepted;

		WL_CHECK(!listen(bound[i], 1), "%s: listen: %s", names[i], strerror(errno));
		WL_CHECK(!connect(unbound[i], (struct sockaddr *)&addr[i], addrlen[i]),
			 "%s: connect: %s", names[i], strerror(errno));
		accepted = accept(bound[i], NULL, NULL);
		WL_CHECK(accepted >= 0, "%s: accept: %s", names[i], strerror(errno));
		if (accepted >= 0) {
			talk(unbound[i], accepted, names[i]);
			talk(accepted, unbound[i], names[i]);
		}
	}
	return wl_finish();
}
