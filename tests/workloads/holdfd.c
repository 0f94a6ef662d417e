/*
 * A descriptor hpccr cannot checkpoint yet: its dump must be refused and leave us untouched.
 *
 * usage: holdfd socket|userfaultfd|linked [SECONDS]
 *
 * Prints "FD <n> <kind>" for the descriptor the dump must name.  Data put in before READY must
 * still be there after the window (nobody drained it), and the descriptor still works.
 * linked: a file opened by one of its two names (hard links, in a new directory under /tmp),
 * the name it was opened by then removed: written through the descriptor, read through the
 * other name.
 */
#include "wl.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

int main(int argc, char **argv)
{
	double window = argc > 2 ? atof(argv[2]) : WL_WINDOW_S;
	char buf[512] = "", dir[] = "/tmp/holdfd-XXXXXX", opened[64], other[64];
	int held, client = -1;

	if (argc < 2)
		goto usage;
	if (!strcmp(argv[1], "socket")) {
		/* a TCP listener with a connection waiting to be accepted, which sent "ping"
		 * (other network sockets are supported) */
		struct sockaddr_in sin = { .sin_family = AF_INET,
					   .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
		socklen_t len = sizeof(sin);

		held = socket(AF_INET, SOCK_STREAM, 0);
		if (held < 0 || bind(held, (struct sockaddr *)&sin, sizeof(sin)) || listen(held, 1)
		    || getsockname(held, (struct sockaddr *)&sin, &len)
		    || (client = socket(AF_INET, SOCK_STREAM, 0)) < 0
		    || connect(client, (struct sockaddr *)&sin, len)
		    || send(client, "ping", 4, 0) != 4)
			wl_die("socket");
	} else if (!strcmp(argv[1], "userfaultfd")) {
		held = syscall(SYS_userfaultfd, O_NONBLOCK);
		if (held < 0)
			wl_die("userfaultfd");
	} else if (!strcmp(argv[1], "linked")) {
		if (!mkdtemp(dir))
			wl_die("mkdtemp");
		snprintf(opened, sizeof(opened), "%s/opened", dir);
		snprintf(other, sizeof(other), "%s/other", dir);
		held = open(opened, O_RDWR | O_CREAT | O_EXCL, 0600);
		if (held < 0 || link(opened, other) || unlink(opened))
			wl_die("linked");
	} else {
		goto usage;
	}
	printf("FD %d %s\n", held, argv[1]);
	wl_ready();

	wl_sleep(window);

	if (!strcmp(argv[1], "linked")) {
		/* the descriptor and the other name are one file */
		int again;

		WL_CHECK(pwrite(held, "ping", 4, 0) == 4, "writing: %s", strerror(errno));
		again = open(other, O_RDONLY);
		WL_CHECK(again >= 0 && read(again, buf, 4) == 4 && !memcmp(buf, "ping", 4),
			 "the other name is another file now");
		unlink(other);
		rmdir(dir);
	} else if (!strcmp(argv[1], "userfaultfd")) {
		/* still the same, unused descriptor: its API handshake works once */
		struct uffdio_api api = { .api = UFFD_API };

		WL_CHECK(ioctl(held, UFFDIO_API, &api) == 0, "the userfaultfd is not new: %s",
			 strerror(errno));
	} else {
		int conn = accept(held, NULL, NULL);

		WL_CHECK(conn >= 0 && recv(conn, buf, 4, MSG_WAITALL) == 4
			 && !memcmp(buf, "ping", 4), "the %s lost its data", argv[1]);
		close(client);
	}
	return wl_finish();
usage:
	fprintf(stderr, "usage: holdfd socket|userfaultfd|linked [SECONDS]\n");
	return 2;
}
