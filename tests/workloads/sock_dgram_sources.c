/*
 * Datagrams queued on a bound unix socket, sent to its name by other sockets (sendto), as
 * MPICH's ranks do: two from a socket with a name of its own, one from a socket without.
 *
 * usage: sock_dgram_sources
 *
 * Before READY the socket bound to an abstract name "...-named" and an unnamed one send three
 * datagrams, in turn, to the socket bound to "...-root"; nobody reads.  After the window the
 * root socket reads them in order, each with its content and its sender's address (the named
 * socket's name, or none), and nothing more.
 */
#include "sock.h"

static void send_to(int fd, const struct sockaddr_un *to, socklen_t len, const char *text)
{
	if (sendto(fd, text, strlen(text), 0, (const struct sockaddr *)to, len)
	    != (ssize_t)strlen(text))
		wl_die("sendto");
}

static void expect(int fd, const char *text, const struct sockaddr_un *from, socklen_t from_len)
{
	struct sockaddr_un got;
	socklen_t len = sizeof(got);
	char buf[64];
	ssize_t n = recvfrom(fd, buf, sizeof(buf), MSG_DONTWAIT, (struct sockaddr *)&got, &len);

	if (n < 0) {
		wl_fail("datagram '%s' missing: %s", text, strerror(errno));
		return;
	}
	WL_CHECK((size_t)n == strlen(text) && !memcmp(buf, text, n), "datagram '%s' changed", text);
	WL_CHECK(from ? len == from_len && !memcmp(&got, from, len)
		      : len <= offsetof(struct sockaddr_un, sun_path),
		 "datagram '%s' has another sender address", text);
}

int main(void)
{
	struct sockaddr_un root_addr, named_addr;
	socklen_t root_len, named_len;
	char name[64];
	int root, named, anonymous;

	snprintf(name, sizeof(name), "hpccr-dgram-%d-root", getpid());
	root_len = sock_addr(&root_addr, name, 1);
	snprintf(name, sizeof(name), "hpccr-dgram-%d-named", getpid());
	named_len = sock_addr(&named_addr, name, 1);
	root = socket(AF_UNIX, SOCK_DGRAM, 0);
	named = socket(AF_UNIX, SOCK_DGRAM, 0);
	anonymous = socket(AF_UNIX, SOCK_DGRAM, 0);
	if (root < 0 || named < 0 || anonymous < 0
	    || bind(root, (struct sockaddr *)&root_addr, root_len)
	    || bind(named, (struct sockaddr *)&named_addr, named_len))
		wl_die("bind");
	send_to(named, &root_addr, root_len, "first, named");
	send_to(anonymous, &root_addr, root_len, "second, anonymous");
	send_to(named, &root_addr, root_len, "third, named");
	wl_ready();
	wl_sleep(WL_WINDOW_S);
	expect(root, "first, named", &named_addr, named_len);
	expect(root, "second, anonymous", NULL, 0);
	expect(root, "third, named", &named_addr, named_len);
	WL_CHECK(recv(root, name, 1, MSG_DONTWAIT) < 0 && errno == EAGAIN,
		 "more than three datagrams queued");
	return wl_finish();
}
