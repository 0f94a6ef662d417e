/*
 * A descriptor hpccr cannot checkpoint yet: its dump must be refused and leave us untouched.
 *
 * usage: holdfd pipe|socket|eventfd [SECONDS]
 *
 * Prints "FD <n> <kind>" for the descriptor the dump must name.  Data put in before READY must
 * still be there after the window (nobody drained it), and the descriptor still works.
 */
#include "wl.h"

#include <sys/eventfd.h>
#include <sys/socket.h>

int main(int argc, char **argv)
{
	double window = argc > 2 ? atof(argv[2]) : WL_WINDOW_S;
	int fds[2], held;
	uint64_t count = 0;
	char buf[8] = "";

	if (argc < 2)
		goto usage;
	if (!strcmp(argv[1], "pipe")) {
		if (pipe(fds) || write(fds[1], "ping", 4) != 4)
			wl_die("pipe");
		held = fds[0];
	} else if (!strcmp(argv[1], "socket")) {
		if (socketpair(AF_UNIX, SOCK_STREAM, 0, fds) || write(fds[1], "ping", 4) != 4)
			wl_die("socketpair");
		held = fds[0];
	} else if (!strcmp(argv[1], "eventfd")) {
		held = eventfd(4, 0);
		if (held < 0)
			wl_die("eventfd");
	} else {
		goto usage;
	}
	printf("FD %d %s\n", held, argv[1]);
	wl_ready();

	wl_sleep(window);

	if (!strcmp(argv[1], "eventfd"))
		WL_CHECK(read(held, &count, sizeof(count)) == sizeof(count) && count == 4,
			 "eventfd counter is %llu, not 4", (unsigned long long)count);
	else
		WL_CHECK(read(held, buf, sizeof(buf)) == 4 && !memcmp(buf, "ping", 4),
			 "the %s lost its data", argv[1]);
	return wl_finish();
usage:
	fprintf(stderr, "usage: holdfd pipe|socket|eventfd [SECONDS]\n");
	return 2;
}
