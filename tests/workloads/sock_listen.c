/*
 * A listening unix socket bound to a path, one connection accepted and one still waiting in
 * the accept queue, with data in flight on the accepted one.
 *
 * usage: sock_listen DIR [early]
 *
 * The root binds DIR/listen.sock (mode 0640) and listens; child "c1" connects and sends 8
 * messages; the root accepts it and sends 8 messages back; child "c2" connects and waits in the
 * accept queue.  Nobody reads during the window.  Then: the root reads c1's messages (the
 * accepted socket is named DIR/listen.sock, its peer credentials are c1's pid and uid), accepts
 * c2 at once (without blocking: its peer credentials name c2) and sends it "hi"; c1 reads the
 * root's messages (its peer credentials name the root, which listened), c2 reads "hi";
 * the path is still a socket file of mode 0640 on which a new connection is accepted.
 * "early": c2 also sends "early" on its connection before it is accepted (a dump must refuse:
 * that data can only be read by accepting the connection).
 */
#include "sock.h"

#include <sys/stat.h>

#define MESSAGES 8

static struct sockaddr_un addr;
static socklen_t addrlen;

static int client(void)
{
	int fd = socket(AF_UNIX, SOCK_STREAM, 0);

	if (fd < 0 || connect(fd, (struct sockaddr *)&addr, addrlen))
		wl_die("connect");
	return fd;
}

int main(int argc, char **argv)
{
	char path[256], buf[8] = "";
	struct sockaddr_un name;
	socklen_t len = sizeof(name);
	struct stat st;
	int lsn, c1, c2, s1, s2, extra, early = argc > 2 && !strcmp(argv[2], "early");
	pid_t p1, p2;

	if (argc < 2) {
		fprintf(stderr, "usage: sock_listen DIR\n");
		return 2;
	}
	snprintf(path, sizeof(path), "%s/listen.sock", argv[1]);
	unlink(path);
	addrlen = sock_addr(&addr, path, 0);
	tree_start();
	lsn = socket(AF_UNIX, SOCK_STREAM, 0);
	if (lsn < 0 || bind(lsn, (struct sockaddr *)&addr, addrlen) || chmod(path, 0640)
	    || listen(lsn, 4))
		wl_die("listen");
	p1 = tree_fork("c1");
	if (p1 == 0) {
		close(lsn);
		c1 = client();
		for (int i = 0; i < MESSAGES; i++)
			sock_send(c1, 1, i);
		tree_ready();
		wl_sleep(WL_WINDOW_S);
		tree_check_place();
		sock_expect_stream(c1, 2, MESSAGES, "c1");
		sock_expect_peer(c1, getppid(), "its connection");
		tree_exit();
	}
	s1 = accept(lsn, NULL, NULL);
	if (s1 < 0)
		wl_die("accept");
	for (int i = 0; i < MESSAGES; i++)
		sock_send(s1, 2, i);
	p2 = tree_fork("c2");
	if (p2 == 0) {
		close(lsn);
		close(s1);
		c2 = client();
		if (early && send(c2, "early", 5, 0) != 5)
			wl_die("send");
		tree_ready();
		wl_sleep(WL_WINDOW_S);
		tree_check_place();
		WL_CHECK(recv(c2, buf, sizeof(buf), 0) == 2 && !memcmp(buf, "hi", 2),
			 "c2: no \"hi\" from the server");
		tree_exit();
	}
	tree_wait_ready(2);
	wl_sleep(WL_WINDOW_S);
	tree_check_place();
	sock_expect_stream(s1, 1, MESSAGES, "root");
	WL_CHECK(!getsockname(s1, (struct sockaddr *)&name, &len)
		 && !strcmp(name.sun_path, path), "the accepted socket is no longer named %s", path);
	sock_expect_peer(s1, p1, "c1's connection");
	s2 = accept4(lsn, NULL, NULL, SOCK_NONBLOCK);
	WL_CHECK(s2 >= 0, "c2's connection is not waiting: %s", strerror(errno));
	if (s2 >= 0)
		sock_expect_peer(s2, p2, "c2's connection");
	if (s2 >= 0)
		WL_CHECK(send(s2, "hi", 2, 0) == 2, "send to c2: %s", strerror(errno));
	WL_CHECK(!stat(path, &st) && S_ISSOCK(st.st_mode) && (st.st_mode & 07777) == 0640,
		 "%s is no longer a socket file of mode 0640", path);
	extra = client();
	WL_CHECK(accept4(lsn, NULL, NULL, SOCK_NONBLOCK) >= 0, "no new connection accepted: %s",
		 strerror(errno));
	close(extra);
	tree_reap(p1, "c1");
	tree_reap(p2, "c2");
	unlink(path);
	return wl_finish();
}
