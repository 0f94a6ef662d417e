/*
 * Descriptors opened as root before privileges were dropped, as a daemon's worker does.
 *
 * usage: fd_setuid UID DIR
 *
 * The root process, as root, makes a pipe holding "before" and the FIFO DIR/private/fifo
 * (DIR/private is root's, mode 0700), then forks "worker".  The worker, still root, opens the
 * pipe's read end again through /dev/fd (as a program opens /dev/stdin: an open file description
 * of its own) and the FIFO read-write (it writes "fifo" into it), and binds a datagram socket
 * at DIR/private/sock, then drops to UID (setresgid, setresuid, no supplementary groups): it
 * could make none of them again.  After the window the worker checks that it is still UID, that
 * the pipe and the FIFO hold their data and carry new data both ways, and that the socket keeps
 * its name and receives the datagram the root sends to that name after the window.
 */
#include "tree.h"

#include <fcntl.h>
#include <grp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

static struct sockaddr_un sock_addr;

static void check_carries(int r, int w, const char *saved, const char *name)
{
	char buf[16] = "";
	size_t len = strlen(saved);

	WL_CHECK(read(r, buf, sizeof(buf) - 1) == (ssize_t)len && !strcmp(buf, saved),
		 "%s: read \"%s\", not \"%s\"", name, buf, saved);
	memset(buf, 0, sizeof(buf));
	WL_CHECK(write(w, "after", 5) == 5, "%s: write: %s", name, strerror(errno));
	WL_CHECK(read(r, buf, sizeof(buf) - 1) == 5 && !strcmp(buf, "after"),
		 "%s: read back \"%s\", not \"after\"", name, buf);
}

__attribute__((noreturn))
static void worker(uid_t uid, int pipe_w, int pipe_r, const char *fifo_path)
{
	struct timeval patience = { .tv_sec = 10 };
	struct sockaddr_un got;
	socklen_t got_len = sizeof(got);
	char own_end[64], buf[16] = "";
	int r, fifo, sock;

	snprintf(own_end, sizeof(own_end), "/dev/fd/%d", pipe_r);
	r = open(own_end, O_RDONLY);
	fifo = open(fifo_path, O_RDWR);
	if (r < 0 || fifo < 0 || write(fifo, "fifo", 4) != 4)
		wl_die("opening the pipe or the FIFO");
	close(pipe_r);
	sock = socket(AF_UNIX, SOCK_DGRAM, 0);
	if (sock < 0 || bind(sock, (struct sockaddr *)&sock_addr, sizeof(sock_addr)) ||
	    setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &patience, sizeof(patience)))
		wl_die("the socket");
	if (setgroups(0, NULL) || setresgid(uid, uid, uid) || setresuid(uid, uid, uid))
		wl_die("dropping privileges");
	if (open(fifo_path, O_RDWR) >= 0 || errno != EACCES)
		wl_die("the FIFO can still be opened");
	tree_ready();
	wl_sleep(WL_WINDOW_S);
	tree_check_place();
	WL_CHECK(getuid() == uid && geteuid() == uid, "uid %d, euid %d, not %d", getuid(),
		 geteuid(), uid);
	check_carries(r, pipe_w, "before", "pipe");
	check_carries(fifo, fifo, "fifo", "FIFO");
	memset(&got, 0, sizeof(got));
	WL_CHECK(!getsockname(sock, (struct sockaddr *)&got, &got_len) &&
		 !strcmp(got.sun_path, sock_addr.sun_path), "socket: named \"%s\"", got.sun_path);
	WL_CHECK(recv(sock, buf, sizeof(buf) - 1, 0) == 5 && !strcmp(buf, "hello"),
		 "socket: no datagram from the root: %s", strerror(errno));
	tree_exit();
}

int main(int argc, char **argv)
{
	char private[2048], fifo_path[4096];
	int p[2];
	pid_t child;

	if (argc != 3)
		wl_die("usage: fd_setuid UID DIR");
	snprintf(private, sizeof(private), "%s/private", argv[2]);
	snprintf(fifo_path, sizeof(fifo_path), "%s/fifo", private);
	sock_addr.sun_family = AF_UNIX;
	if (snprintf(sock_addr.sun_path, sizeof(sock_addr.sun_path), "%s/sock", private) >=
	    (int)sizeof(sock_addr.sun_path))
		wl_die("DIR is too long");
	if (mkdir(private, 0700) || mkfifo(fifo_path, 0600) || pipe(p))
		wl_die("mkdir, mkfifo or pipe");
	if (write(p[1], "before", 6) != 6)
		wl_die("write");
	tree_start();
	child = tree_fork("worker");
	if (child == 0)
		worker(atoi(argv[1]), p[1], p[0], fifo_path);
	tree_wait_ready(1);
	wl_sleep(WL_WINDOW_S);
	tree_check_place();
	{
		int sender = socket(AF_UNIX, SOCK_DGRAM, 0);

		WL_CHECK(sender >= 0 && sendto(sender, "hello", 5, 0, (struct sockaddr *)&sock_addr,
					       sizeof(sock_addr)) == 5,
			 "sending to the worker's socket: %s", strerror(errno));
	}
	tree_reap(child, "worker");
	return wl_finish();
}
