/*
 * An epoll server (the root) on an abstract unix socket and three clients (its children), with
 * messages in flight at the checkpoint.
 *
 * usage: sock_epoll
 *
 * The root listens on an abstract name, accepts the three clients and closes the listener
 * before READY; each client sends records 0..4 (64 bytes, naming the client and the record)
 * before READY and records 5..6 after the window, then closes.  The root reads nothing before
 * the window is over, then serves every ready socket from one epoll set until each client's end
 * of file, and must have received exactly records 0..6 of each client, in order.  The peer
 * credentials of each connection still name the process at its other end (the root, which
 * listened, for a client; the client, which connected, for the root), and the root's ends
 * still have the name of the listener they were accepted from.
 */
#include "sock.h"

#include <sys/epoll.h>

#define CLIENTS 3
#define BEFORE 5
#define RECORDS 7
#define RECORD 64

static void record(char *buf, int client, int i)
{
	memset(buf, 0, RECORD);
	snprintf(buf, RECORD, "client %d record %d", client, i);
}

static void client(const struct sockaddr_un *addr, socklen_t len, int n)
{
	char buf[RECORD];
	int fd = socket(AF_UNIX, SOCK_STREAM, 0);

	if (fd < 0 || connect(fd, (const struct sockaddr *)addr, len))
		wl_die("connect");
	for (int i = 0; i < BEFORE; i++) {
		record(buf, n, i);
		tree_write_all(fd, buf, RECORD);
	}
	tree_ready();
	wl_sleep(WL_WINDOW_S);
	tree_check_place();
	sock_expect_peer(fd, getppid(), "its connection");
	for (int i = BEFORE; i < RECORDS; i++) {
		record(buf, n, i);
		tree_write_all(fd, buf, RECORD);
	}
	close(fd);
	tree_exit();
}

int main(void)
{
	char name[64], buf[RECORDS * RECORD + 1], want[RECORD];
	size_t got[CLIENTS] = { 0 };
	static char data[CLIENTS][RECORDS * RECORD + 1];
	struct sockaddr_un addr;
	struct epoll_event ev;
	int lsn, ep, conn[CLIENTS], open_clients = CLIENTS;
	pid_t pids[CLIENTS];
	socklen_t len;

	snprintf(name, sizeof(name), "hpccr-sock-epoll-%d-%ld", getpid(), (long)time(NULL));
	len = sock_addr(&addr, name, 1);
	tree_start();
	lsn = socket(AF_UNIX, SOCK_STREAM, 0);
	if (lsn < 0 || bind(lsn, (struct sockaddr *)&addr, len) || listen(lsn, CLIENTS))
		wl_die("listen");
	ep = epoll_create1(0);
	if (ep < 0)
		wl_die("epoll_create1");
	for (int n = 0; n < CLIENTS; n++) {
		char who[16];

		snprintf(who, sizeof(who), "client%d", n);
		pids[n] = tree_fork(strdup(who));
		if (pids[n] == 0) {
			close(lsn);
			close(ep);
			client(&addr, len, n);
		}
		conn[n] = accept(lsn, NULL, NULL);
		ev.events = EPOLLIN;
		ev.data.u32 = n;
		if (conn[n] < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, conn[n], &ev))
			wl_die("accept");
	}
	close(lsn);
	tree_wait_ready(CLIENTS);
	wl_sleep(WL_WINDOW_S);
	tree_check_place();
	for (int n = 0; n < CLIENTS; n++) {
		struct sockaddr_un got_addr;
		socklen_t got_len = sizeof(got_addr);

		sock_expect_peer(conn[n], pids[n], "a connection");
		WL_CHECK(!getsockname(conn[n], (struct sockaddr *)&got_addr, &got_len)
			 && got_len == len && !memcmp(&got_addr, &addr, len),
			 "connection %d no longer has the listener's name", n);
	}
	while (open_clients) {
		int ready = epoll_wait(ep, &ev, 1, 10000);
		int n = ev.data.u32;
		ssize_t r;

		if (ready < 0 && errno == EINTR)
			continue;
		if (ready <= 0) {
			wl_fail("epoll_wait: nothing ready (%d)", ready);
			break;
		}
		r = read(conn[n], buf, sizeof(buf));
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0 || got[n] + r > RECORDS * RECORD) {
			WL_CHECK(r == 0, "client %d: read %zd after %zu bytes", n, r, got[n]);
			epoll_ctl(ep, EPOLL_CTL_DEL, conn[n], NULL);
			close(conn[n]);
			open_clients--;
			continue;
		}
		memcpy(data[n] + got[n], buf, r);
		got[n] += r;
	}
	for (int n = 0; n < CLIENTS; n++) {
		WL_CHECK(got[n] == RECORDS * RECORD, "client %d: %zu bytes, not %d", n, got[n],
			 RECORDS * RECORD);
		for (int i = 0; i < RECORDS && (size_t)(i + 1) * RECORD <= got[n]; i++) {
			record(want, n, i);
			WL_CHECK(!memcmp(data[n] + i * RECORD, want, RECORD),
				 "client %d: record %d is \"%.63s\"", n, i, data[n] + i * RECORD);
		}
	}
	for (int n = 0; n < CLIENTS; n++)
		tree_reap(pids[n], "a client");
	return wl_finish();
}
