/*
 * A TCP connection between two processes of the tree, with data in flight both ways, and a
 * UDP pair beside it.
 *
 * usage: net_tcp v4|v6|mapped flight|halfclosed [userfaultfd]
 *
 * The root listens on loopback (127.0.0.1, ::1, or a v6 socket on ::ffff:127.0.0.1) with
 * options set (SO_REUSEADDR, TCP_NODELAY, keepalive and its intervals, buffer sizes, SO_LINGER,
 * receive timeout, IP_TOS or IPV6_TCLASS); child "client" connects, with options of its own.
 * flight: both ends send, without blocking, until their queues are full (the peer reads
 * nothing before the window): bytes wait in both send and both receive queues.  After the
 * window each end sends the rest of its TOTAL bytes while it reads all of the peer's, and
 * checks them byte for byte.
 * halfclosed: the client sends HALF bytes and shuts its side down for writing; the root sends
 * HALF bytes; nobody reads before the window.  Then the root reads HALF bytes and end of file,
 * sends MORE bytes and closes; the client reads HALF + MORE bytes and end of file, and may not
 * send any more (EPIPE).
 * Both: the UDP pair (the root's bound socket, the client's connected to it) passes a datagram
 * each way after the window; the listener accepts a new connection from a second child; every
 * socket still has its addresses and options.
 * userfaultfd: the root also holds a userfaultfd, after its connection's: a dump reads that
 * connection, then fails (a userfaultfd is not supported), and must leave everything working.
 */
#include "tree.h"
#include "net.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <netinet/tcp.h>
#include <sys/syscall.h>
#include <sys/socket.h>

#define TOTAL (4 << 20)
#define HALF (64 << 10)
#define MORE (10 << 10)
#define SNDBUF (96 << 10)
#define RCVBUF (128 << 10)

static int family;
static struct sockaddr_storage server;
static socklen_t server_len;
static char *mine, *theirs;

static void set(int fd, int level, int name, int value)
{
	if (setsockopt(fd, level, name, &value, sizeof(value)))
		wl_die("setsockopt");
}

static int get(int fd, int level, int name)
{
	int value = -1;
	socklen_t len = sizeof(value);

	if (getsockopt(fd, level, name, &value, &len))
		wl_die("getsockopt");
	return value;
}

/* The options each end sets, different on the two ends (`which` 0 or 1). */
static void set_options(int fd, int which)
{
	struct linger linger = { 1, 7 + which };
	struct timeval timeout = { 30 + which, 500 };

	set(fd, SOL_SOCKET, SO_KEEPALIVE, 1);
	set(fd, IPPROTO_TCP, TCP_KEEPIDLE, 100 + which);
	set(fd, IPPROTO_TCP, TCP_KEEPINTVL, 20 + which);
	set(fd, IPPROTO_TCP, TCP_KEEPCNT, 5 + which);
	set(fd, IPPROTO_TCP, TCP_NODELAY, 1 - which);
	set(fd, SOL_SOCKET, SO_SNDBUF, SNDBUF);
	set(fd, SOL_SOCKET, SO_RCVBUF, RCVBUF);
	if (setsockopt(fd, SOL_SOCKET, SO_LINGER, &linger, sizeof(linger))
	    || setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout)))
		wl_die("setsockopt");
	if (family == AF_INET)
		set(fd, IPPROTO_IP, IP_TOS, 0x10 + 8 * which);
	else
		set(fd, IPPROTO_IPV6, IPV6_TCLASS, 0x20 + 8 * which);
}

static void check_options(int fd, int which, const char *who)
{
	struct linger linger;
	struct timeval timeout;
	socklen_t len = sizeof(linger);

	WL_CHECK(get(fd, SOL_SOCKET, SO_KEEPALIVE) == 1, "%s: keepalive off", who);
	WL_CHECK(get(fd, IPPROTO_TCP, TCP_KEEPIDLE) == 100 + which, "%s: keepidle %d", who,
		 get(fd, IPPROTO_TCP, TCP_KEEPIDLE));
	WL_CHECK(get(fd, IPPROTO_TCP, TCP_KEEPINTVL) == 20 + which, "%s: keepintvl", who);
	WL_CHECK(get(fd, IPPROTO_TCP, TCP_KEEPCNT) == 5 + which, "%s: keepcnt", who);
	WL_CHECK(!!get(fd, IPPROTO_TCP, TCP_NODELAY) == 1 - which, "%s: nodelay", who);
	WL_CHECK(get(fd, SOL_SOCKET, SO_SNDBUF) == 2 * SNDBUF, "%s: sndbuf %d", who,
		 get(fd, SOL_SOCKET, SO_SNDBUF));
	WL_CHECK(get(fd, SOL_SOCKET, SO_RCVBUF) == 2 * RCVBUF, "%s: rcvbuf %d", who,
		 get(fd, SOL_SOCKET, SO_RCVBUF));
	if (getsockopt(fd, SOL_SOCKET, SO_LINGER, &linger, &len))
		wl_die("getsockopt");
	WL_CHECK(linger.l_onoff == 1 && linger.l_linger == 7 + which, "%s: linger", who);
	len = sizeof(timeout);
	if (getsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, &len))
		wl_die("getsockopt");
	WL_CHECK(timeout.tv_sec == 30 + which, "%s: receive timeout %ld", who,
		 (long)timeout.tv_sec);
	if (family == AF_INET)
		WL_CHECK(get(fd, IPPROTO_IP, IP_TOS) == 0x10 + 8 * which, "%s: tos", who);
	else
		WL_CHECK(get(fd, IPPROTO_IPV6, IPV6_TCLASS) == 0x20 + 8 * which, "%s: tclass",
			 who);
}

/* The socket's own address and its peer's are still those it had. */
struct names {
	struct sockaddr_storage self, peer;
};

static void remember(int fd, struct names *n)
{
	socklen_t len = sizeof(n->self);

	memset(n, 0, sizeof(*n));
	if (getsockname(fd, (struct sockaddr *)&n->self, &len))
		wl_die("getsockname");
	len = sizeof(n->peer);
	getpeername(fd, (struct sockaddr *)&n->peer, &len); /* none for a listener */
}

static void check_names(int fd, const struct names *before, const char *who)
{
	struct names now;

	remember(fd, &now);
	WL_CHECK(!memcmp(&now, before, sizeof(now)), "%s: its addresses changed", who);
}

/* Read exactly `len` bytes, then expect end of file. */
static void read_to_end(int fd, const char *expect, size_t len, const char *who)
{
	char *buf = malloc(len + 1);
	size_t got = 0;
	ssize_t n = 1;

	while (got <= len && (n = recv(fd, buf + got, len + 1 - got, 0)) > 0)
		got += n;
	WL_CHECK(got == len && !memcmp(buf, expect, len) && n == 0,
		 "%s: %zu bytes then %s, not %zu bytes then end of file", who, got,
		 n == 0 ? "end of file" : strerror(errno), len);
	free(buf);
}

static int tcp_socket(void)
{
	int fd = socket(family, SOCK_STREAM, 0);

	if (fd < 0)
		wl_die("socket");
	return fd;
}

static int connect_server(int which)
{
	int fd = tcp_socket();

	set_options(fd, which);
	if (connect(fd, (struct sockaddr *)&server, server_len))
		wl_die("connect");
	return fd;
}

int main(int argc, char **argv)
{
	const char *how = argc > 1 ? argv[1] : "", *what = argc > 2 ? argv[2] : "";
	int halfclosed = !strcmp(what, "halfclosed");
	struct names listener_names, conn_names, udp_names;
	struct sockaddr_storage peer;
	socklen_t len, peer_len;
	size_t root_sent = 0;
	int lsn, conn, udp;
	pid_t client, second;
	char dgram[16];

	if ((strcmp(how, "v4") && strcmp(how, "v6") && strcmp(how, "mapped"))
	    || (strcmp(what, "flight") && !halfclosed)) {
		fprintf(stderr, "usage: net_tcp v4|v6|mapped flight|halfclosed\n");
		return 2;
	}
	family = strcmp(how, "v4") ? AF_INET6 : AF_INET;
	memset(&server, 0, sizeof(server));
	if (family == AF_INET) {
		struct sockaddr_in *in = (struct sockaddr_in *)&server;

		in->sin_family = AF_INET;
		in->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		server_len = sizeof(*in);
	} else {
		struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&server;

		in6->sin6_family = AF_INET6;
		inet_pton(AF_INET6, strcmp(how, "v6") ? "::ffff:127.0.0.1" : "::1",
			  &in6->sin6_addr);
		server_len = sizeof(*in6);
	}
	mine = malloc(TOTAL);
	theirs = malloc(TOTAL);
	if (!mine || !theirs)
		wl_die("malloc");

	lsn = tcp_socket();
	set(lsn, SOL_SOCKET, SO_REUSEADDR, 1);
	if (bind(lsn, (struct sockaddr *)&server, server_len) || listen(lsn, 8))
		wl_die("listen");
	len = server_len;
	if (getsockname(lsn, (struct sockaddr *)&server, &len))
		wl_die("getsockname");
	remember(lsn, &listener_names);
	udp = socket(family, SOCK_DGRAM, 0);
	if (udp < 0 || bind(udp, (struct sockaddr *)&server, server_len))
		wl_die("udp bind");

	tree_start();
	client = tree_fork("client");
	if (client == 0) {
		struct names names, udp_client;
		size_t sent = 0;
		int fd, u;

		close(lsn);
		wl_fill(mine, TOTAL, 2);
		wl_fill(theirs, TOTAL, 1);
		fd = connect_server(1);
		u = socket(family, SOCK_DGRAM, 0);
		if (u < 0 || connect(u, (struct sockaddr *)&server, server_len))
			wl_die("udp connect");
		remember(fd, &names);
		remember(u, &udp_client);
		if (halfclosed) {
			if (send(fd, mine, HALF, 0) != HALF || shutdown(fd, SHUT_WR))
				wl_die("send");
		} else {
			sent = net_fill(fd, mine, TOTAL);
		}
		tree_ready();
		wl_sleep(WL_WINDOW_S);
		tree_check_place();
		check_names(fd, &names, "client");
		check_names(u, &udp_client, "client udp");
		check_options(fd, 1, "client");
		/* The root closes the connection only once this datagram tells it names are checked. */
		if (send(u, "ping", 4, 0) != 4 || recv(u, dgram, sizeof(dgram), 0) != 4
		    || memcmp(dgram, "pong", 4))
			wl_fail("client: udp exchange failed");
		if (halfclosed) {
			read_to_end(fd, theirs, HALF + MORE, "client");
			WL_CHECK(send(fd, "x", 1, MSG_NOSIGNAL) < 0 && errno == EPIPE,
				 "client: could send after its shutdown");
		} else {
			net_exchange(fd, mine, theirs, TOTAL, sent, "client");
		}
		tree_exit();
	}
	wl_fill(mine, TOTAL, 1);
	wl_fill(theirs, TOTAL, 2);
	conn = accept(lsn, NULL, NULL);
	if (conn < 0)
		wl_die("accept");
	set_options(conn, 0);
	if (argc > 3 && !strcmp(argv[3], "userfaultfd") && syscall(SYS_userfaultfd, 0) < 0)
		wl_die("userfaultfd");
	remember(conn, &conn_names);
	remember(udp, &udp_names);
	if (halfclosed) {
		if (send(conn, mine, HALF, 0) != HALF)
			wl_die("send");
	} else {
		root_sent = net_fill(conn, mine, TOTAL);
	}
	tree_wait_ready(1);
	wl_sleep(WL_WINDOW_S);
	tree_check_place();
	check_names(lsn, &listener_names, "listener");
	check_names(conn, &conn_names, "root");
	check_names(udp, &udp_names, "root udp");
	check_options(conn, 0, "root");
	WL_CHECK(get(lsn, SOL_SOCKET, SO_REUSEADDR) == 1, "listener: SO_REUSEADDR off");
	peer_len = sizeof(peer);
	if (recvfrom(udp, dgram, sizeof(dgram), 0, (struct sockaddr *)&peer, &peer_len) != 4
	    || memcmp(dgram, "ping", 4)
	    || sendto(udp, "pong", 4, 0, (struct sockaddr *)&peer, peer_len) != 4)
		wl_fail("root: udp exchange failed");
	if (halfclosed) {
		read_to_end(conn, theirs, HALF, "root");
		if (send(conn, mine + HALF, MORE, 0) != MORE)
			wl_die("send");
	} else {
		net_exchange(conn, mine, theirs, TOTAL, root_sent, "root");
	}
	close(conn);
	second = tree_fork("second");
	if (second == 0) {
		int fd = connect_server(1);

		if (send(fd, "hi", 2, 0) != 2)
			wl_fail("second: send");
		tree_exit();
	}
	conn = accept(lsn, NULL, NULL);
	if (conn < 0 || recv(conn, dgram, 2, MSG_WAITALL) != 2 || memcmp(dgram, "hi", 2))
		wl_fail("root: no new connection accepted by the listener");
	tree_reap(client, "client");
	tree_reap(second, "second");
	return wl_finish();
}
