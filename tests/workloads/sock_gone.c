/*
 * Unix sockets whose bound name no longer leads to them.
 *
 * usage: sock_gone DIR
 *
 * - moved: a listener bound at DIR/sub/moved.sock with one accepted connection, then DIR/sub
 *   removed (the socket file and its directory);
 * - unlinked: a datagram socket bound at DIR/unlinked.sock, which another datagram socket
 *   connected to, then the file unlinked; one datagram is queued on it;
 * - reused: a listener bound at DIR/reused.sock with one accepted connection, its file unlinked,
 *   and a second listener bound to the same name since (it owns the file now).
 * After the window: every socket still has its name (getsockname), DIR/sub and
 * DIR/unlinked.sock do not exist, the connections and the datagram socket carry data, and
 * connecting to DIR/reused.sock reaches the second listener, not the first.
 */
#include "sock.h"

#include <sys/stat.h>

static char dir[80];

static int bound(int type, const char *name, struct sockaddr_un *addr)
{
	int fd = socket(AF_UNIX, type, 0);

	memset(addr, 0, sizeof(*addr));
	addr->sun_family = AF_UNIX;
	snprintf(addr->sun_path, sizeof(addr->sun_path), "%s/%s", dir, name);
	if (fd < 0 || bind(fd, (struct sockaddr *)addr, sizeof(*addr)))
		wl_die(name);
	return fd;
}

static void connected_pair(int listener, const struct sockaddr_un *addr, int *client, int *server)
{
	*client = socket(AF_UNIX, SOCK_STREAM, 0);
	if (*client < 0 || listen(listener, 4) ||
	    connect(*client, (const struct sockaddr *)addr, sizeof(*addr)))
		wl_die("connect");
	*server = accept(listener, NULL, NULL);
	if (*server < 0)
		wl_die("accept");
}

static void check_name(int fd, const struct sockaddr_un *addr, const char *what)
{
	struct sockaddr_un got;
	socklen_t len = sizeof(got);

	memset(&got, 0, sizeof(got));
	WL_CHECK(!getsockname(fd, (struct sockaddr *)&got, &len) &&
		 !strcmp(got.sun_path, addr->sun_path),
		 "%s: named \"%s\", not \"%s\"", what, got.sun_path, addr->sun_path);
}

static void check_carries(int a, int b, const char *what)
{
	char buf[8] = "";

	WL_CHECK(send(a, "ping", 4, 0) == 4 && recv(b, buf, sizeof(buf), MSG_DONTWAIT) == 4 &&
		 !memcmp(buf, "ping", 4), "%s: no ping", what);
	WL_CHECK(send(b, "pong", 4, 0) == 4 && recv(a, buf, sizeof(buf), MSG_DONTWAIT) == 4 &&
		 !memcmp(buf, "pong", 4), "%s: no pong", what);
}

int main(int argc, char **argv)
{
	struct sockaddr_un moved_addr, unlinked_addr, old_addr, new_addr;
	int moved, moved_c, moved_s, unlinked, sender, old, old_c, old_s, new, probe, accepted;
	char buf[16] = "", sub[96];
	struct stat st;

	if (argc != 2 || strlen(argv[1]) >= sizeof(dir))
		wl_die("usage: sock_gone DIR (a short path)");
	snprintf(dir, sizeof(dir), "%s", argv[1]);
	snprintf(sub, sizeof(sub), "%s/sub", dir);
	if (mkdir(sub, 0755))
		wl_die("mkdir");
	moved = bound(SOCK_STREAM, "sub/moved.sock", &moved_addr);
	connected_pair(moved, &moved_addr, &moved_c, &moved_s);
	if (unlink(moved_addr.sun_path) || rmdir(sub))
		wl_die("removing DIR/sub");

	unlinked = bound(SOCK_DGRAM, "unlinked.sock", &unlinked_addr);
	sender = socket(AF_UNIX, SOCK_DGRAM, 0);
	if (sender < 0 || connect(sender, (struct sockaddr *)&unlinked_addr, sizeof(unlinked_addr)) ||
	    unlink(unlinked_addr.sun_path) || send(sender, "queued", 6, 0) != 6)
		wl_die("the unlinked datagram socket");

	old = bound(SOCK_STREAM, "reused.sock", &old_addr);
	connected_pair(old, &old_addr, &old_c, &old_s);
	if (unlink(old_addr.sun_path))
		wl_die("unlink");
	new = bound(SOCK_STREAM, "reused.sock", &new_addr);
	if (listen(new, 4))
		wl_die("listen");
	wl_ready();

	wl_sleep(WL_WINDOW_S);

	check_name(moved, &moved_addr, "moved");
	check_name(unlinked, &unlinked_addr, "unlinked");
	check_name(old, &old_addr, "reused, the first");
	check_name(new, &new_addr, "reused, the second");
	WL_CHECK(stat(sub, &st) && errno == ENOENT, "DIR/sub exists again");
	WL_CHECK(stat(unlinked_addr.sun_path, &st) && errno == ENOENT,
		 "DIR/unlinked.sock exists again");
	check_carries(moved_c, moved_s, "moved");
	check_carries(old_c, old_s, "reused, the first");
	WL_CHECK(recv(unlinked, buf, sizeof(buf), MSG_DONTWAIT) == 6 && !memcmp(buf, "queued", 6),
		 "unlinked: the queued datagram is lost");
	WL_CHECK(send(sender, "again", 5, 0) == 5 && recv(unlinked, buf, sizeof(buf), MSG_DONTWAIT) == 5,
		 "unlinked: no datagram from its connected sender");
	probe = socket(AF_UNIX, SOCK_STREAM, 0);
	WL_CHECK(!connect(probe, (struct sockaddr *)&new_addr, sizeof(new_addr)),
		 "reused: cannot connect: %s", strerror(errno));
	fcntl(new, F_SETFL, O_NONBLOCK);
	accepted = accept(new, NULL, NULL);
	WL_CHECK(accepted >= 0, "reused: the second listener has no connection: %s",
		 strerror(errno));
	return wl_finish();
}
