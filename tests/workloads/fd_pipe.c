/*
 * Pipes inside one process: unread data, capacity, flags and connections are kept, and a dump
 * that leaves the process running consumes nothing.
 *
 * usage: fd_pipe [peer]
 *
 * - big: 1 MiB capacity (F_SETPIPE_SZ) holding 100 KiB of wl_fill() data; the write end is
 *   O_NONBLOCK, the read end blocking and dup'd to fd 40 (one open file description)
 * - empty: nothing in it, both ends blocking
 * - eof: "tail" in it, write end closed: "tail", then end of file
 * - broken: read end closed, and a second write end opened through /proc/self/fd (its own open
 *   file description): writing to either fails with EPIPE (SIGPIPE ignored)
 * After the window each pipe is still connected to its own ends.
 *
 * "peer": only a pipe whose write end a child process holds (dumped with us, as our tree);
 * prints "FD <read end> pipe".  The child writes "ping" and exits after the window; we read
 * "ping".
 */
#include "wl.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/wait.h>

#define BIG_CAPACITY (1 << 20)
#define BIG_DATA (100 * 1024)
#define DUP_FD 40

static int peer(void)
{
	char buf[8] = "";
	int p[2], status;
	pid_t child;

	if (pipe(p))
		wl_die("pipe");
	child = fork();
	if (child < 0)
		wl_die("fork");
	if (child == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		close(p[0]);
		if (write(p[1], "ping", 4) != 4)
			_exit(1);
		wl_sleep(WL_WINDOW_S + 1);
		_exit(0);
	}
	close(p[1]);
	printf("FD %d pipe\n", p[0]);
	wl_ready();

	wl_sleep(WL_WINDOW_S);

	WL_CHECK(read(p[0], buf, sizeof(buf)) == 4 && !memcmp(buf, "ping", 4),
		 "the pipe lost its data");
	WL_CHECK(waitpid(child, &status, 0) == child && WIFEXITED(status) && !WEXITSTATUS(status),
		 "the child failed");
	return wl_finish();
}

static int pending(int fd)
{
	int n = -1;

	ioctl(fd, FIONREAD, &n);
	return n;
}

int main(int argc, char **argv)
{
	static char data[BIG_DATA], got[BIG_DATA];
	int big[2], empty[2], eof[2], broken[2], broken2, n;
	char buf[32] = "";

	if (argc > 1 && !strcmp(argv[1], "peer"))
		return peer();
	signal(SIGPIPE, SIG_IGN);
	wl_fill(data, sizeof(data), 42);
	if (pipe(big) || fcntl(big[0], F_SETPIPE_SZ, BIG_CAPACITY) != BIG_CAPACITY ||
	    fcntl(big[1], F_SETFL, O_NONBLOCK) || write(big[1], data, BIG_DATA) != BIG_DATA ||
	    dup2(big[0], DUP_FD) != DUP_FD)
		wl_die("big pipe");
	if (pipe(empty) || pipe(eof) || write(eof[1], "tail", 4) != 4 || close(eof[1]) ||
	    pipe(broken))
		wl_die("pipes");
	snprintf(buf, sizeof(buf), "/proc/self/fd/%d", broken[1]);
	broken2 = open(buf, O_WRONLY);
	if (broken2 < 0 || close(broken[0]))
		wl_die("second write end");
	wl_ready();

	wl_sleep(WL_WINDOW_S);

	WL_CHECK(fcntl(big[0], F_GETPIPE_SZ) == BIG_CAPACITY, "capacity %d, not %d",
		 fcntl(big[0], F_GETPIPE_SZ), BIG_CAPACITY);
	WL_CHECK(pending(big[0]) == BIG_DATA, "%d bytes in the pipe, not %d", pending(big[0]),
		 BIG_DATA);
	WL_CHECK(!(fcntl(big[0], F_GETFL) & O_NONBLOCK) && (fcntl(big[1], F_GETFL) & O_NONBLOCK),
		 "O_NONBLOCK moved between the ends");
	WL_CHECK((fcntl(big[0], F_GETFL) & O_ACCMODE) == O_RDONLY &&
		 (fcntl(big[1], F_GETFL) & O_ACCMODE) == O_WRONLY, "the ends changed their modes");
	n = read(DUP_FD, got, 1000);
	n += read(big[0], got + 1000, BIG_DATA - 1000);
	WL_CHECK(n == BIG_DATA, "read %d bytes, not %d (or fd %d is no dup)", n, BIG_DATA, DUP_FD);
	WL_CHECK(!memcmp(got, data, BIG_DATA), "the pipe data differs at byte %ld",
		 wl_verify(got, BIG_DATA, 42));
	WL_CHECK(write(big[1], "x", 1) == 1 && read(big[0], buf, 1) == 1 && buf[0] == 'x',
		 "the big pipe's ends are no longer connected");

	WL_CHECK(pending(empty[0]) == 0, "the empty pipe holds %d bytes", pending(empty[0]));
	WL_CHECK(write(empty[1], "y", 1) == 1 && read(empty[0], buf, 1) == 1 && buf[0] == 'y',
		 "the empty pipe's ends are no longer connected");

	WL_CHECK(read(eof[0], buf, sizeof(buf)) == 4 && !memcmp(buf, "tail", 4),
		 "the half-closed pipe lost its data");
	WL_CHECK(read(eof[0], buf, sizeof(buf)) == 0, "no end of file after the data");

	WL_CHECK(write(broken[1], "z", 1) == -1 && errno == EPIPE,
		 "a pipe without reader accepts data");
	WL_CHECK(write(broken2, "z", 1) == -1 && errno == EPIPE,
		 "the second write end of a pipe without reader accepts data");
	return wl_finish();
}
