/*
 * A TCP client of a server outside the dumped tree (the test's), with data in flight.
 *
 * usage: net_client ADDRESS PORT [SOURCE] [reset]
 *
 * Connects to ADDRESS:PORT (from SOURCE, an address of this machine, if given), sends without
 * blocking until its queues are full (the server reads nothing yet), prints READY.  After the
 * window it sends the rest of TOTAL bytes while it reads TOTAL bytes from the server, each
 * stream wl_fill()ed from its own seed (the client's 7, the server's 8), and checks them.
 * reset: instead, its first read after the window must fail with ECONNRESET (the connection
 * was restored closed, as after a network failure).
 */
#include "net.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>

#define TOTAL (1 << 20)

static int resolve(const char *host, const char *port, struct sockaddr_storage *out,
		   socklen_t *len)
{
	struct addrinfo hints = { .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV }, *res;

	if (getaddrinfo(host, port, &hints, &res))
		return -1;
	memcpy(out, res->ai_addr, res->ai_addrlen);
	*len = res->ai_addrlen;
	freeaddrinfo(res);
	return 0;
}

int main(int argc, char **argv)
{
	struct sockaddr_storage server, source;
	socklen_t server_len, source_len;
	int reset = argc > 3 && !strcmp(argv[argc - 1], "reset");
	const char *from = argc > 3 && !(argc == 4 && reset) ? argv[3] : NULL;
	char *mine = malloc(TOTAL), *theirs = malloc(TOTAL);
	size_t sent;
	char c;
	int fd;

	if (argc < 3 || resolve(argv[1], argv[2], &server, &server_len)
	    || (from && resolve(from, "0", &source, &source_len)) || !mine || !theirs) {
		fprintf(stderr, "usage: net_client ADDRESS PORT [SOURCE] [reset]\n");
		return 2;
	}
	wl_fill(mine, TOTAL, 7);
	wl_fill(theirs, TOTAL, 8);
	fd = socket(server.ss_family, SOCK_STREAM, 0);
	if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &(int){ 64 << 10 }, sizeof(int)) || (from && bind(fd, (struct sockaddr *)&source, source_len))
	    || connect(fd, (struct sockaddr *)&server, server_len))
		wl_die("connect");
	sent = net_fill(fd, mine, TOTAL);
	wl_ready();
	wl_sleep(WL_WINDOW_S);
	if (reset) {
		WL_CHECK(recv(fd, &c, 1, 0) < 0 && errno == ECONNRESET,
			 "the connection was not reset: %s", strerror(errno));
		return wl_finish();
	}
	net_exchange(fd, mine, theirs, TOTAL, sent, "client");
	return wl_finish();
}
