/*
 * A TCP server with a client outside the dumped tree (the test's), with data in flight.
 *
 * usage: net_server ADDRESS
 *
 * Listens on ADDRESS (port chosen by the kernel), prints "PORT <n>", accepts one client, sends
 * without blocking until its queues are full (the client reads nothing yet), prints READY.
 * After the window it sends the rest of TOTAL bytes while it reads TOTAL bytes from the
 * client, each stream wl_fill()ed from its own seed (the server's 8, the client's 7), and
 * checks them; then the listener accepts a second connection (it still listens).
 */
#include "net.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>

#define TOTAL (1 << 20)

int main(int argc, char **argv)
{
	struct addrinfo hints = { .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV }, *res;
	struct sockaddr_storage self;
	socklen_t len = sizeof(self);
	char *mine = malloc(TOTAL), *theirs = malloc(TOTAL);
	size_t sent;
	int lsn, fd, second;

	if (argc < 2 || getaddrinfo(argv[1], "0", &hints, &res) || !mine || !theirs) {
		fprintf(stderr, "usage: net_server ADDRESS\n");
		return 2;
	}
	wl_fill(mine, TOTAL, 8);
	wl_fill(theirs, TOTAL, 7);
	lsn = socket(res->ai_family, SOCK_STREAM, 0);
	if (lsn < 0 || bind(lsn, res->ai_addr, res->ai_addrlen) || listen(lsn, 2)
	    || getsockname(lsn, (struct sockaddr *)&self, &len))
		wl_die("listen");
	printf("PORT %d\n", ntohs(((struct sockaddr_in *)&self)->sin_port));
	fflush(stdout);
	fd = accept(lsn, NULL, NULL);
	if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &(int){ 64 << 10 }, sizeof(int)))
		wl_die("accept");
	sent = net_fill(fd, mine, TOTAL);
	wl_ready();
	wl_sleep(WL_WINDOW_S);
	net_exchange(fd, mine, theirs, TOTAL, sent, "server");
	second = accept(lsn, NULL, NULL);
	WL_CHECK(second >= 0, "the listener accepts no more: %s", strerror(errno));
	return wl_finish();
}
