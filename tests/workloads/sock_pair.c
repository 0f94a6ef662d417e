/*
 * A socketpair between a parent and its child with messages queued in both directions.
 *
 * usage: sock_pair stream|seqpacket|dgram
 *
 * Before READY the parent sends 8 messages (wl_fill-like, 1..4000 bytes each) to the child and
 * the child 8 to the parent; nobody reads during the window.  The parent's end is O_NONBLOCK,
 * the child's has SO_RCVBUF set.  For stream and seqpacket the child then shuts down writing.
 * After the window each side finds exactly the messages sent to it (with their boundaries
 * for seqpacket and dgram; stream: the same bytes), then nothing more (and end of file for the
 * parent where the child shut down); the parent sends one more message, which the child gets
 * after the others.  The peer credentials of both ends are the parent's, which made the pair:
 * its pid, and the process's own uid and gid.
 */
#include "sock.h"

#define MESSAGES 8
#define RCVBUF 100000

int main(int argc, char **argv)
{
	int type, sv[2], rcvbuf = 0, stream;
	socklen_t len = sizeof(rcvbuf);
	pid_t child;
	char c;

	if (argc < 2)
		goto usage;
	if (!strcmp(argv[1], "stream"))
		type = SOCK_STREAM;
	else if (!strcmp(argv[1], "seqpacket"))
		type = SOCK_SEQPACKET;
	else if (!strcmp(argv[1], "dgram"))
		type = SOCK_DGRAM;
	else
		goto usage;
	stream = type == SOCK_STREAM;
	tree_start();
	if (socketpair(AF_UNIX, type, 0, sv))
		wl_die("socketpair");
	child = tree_fork("child");
	if (child == 0) {
		close(sv[0]);
		if (setsockopt(sv[1], SOL_SOCKET, SO_RCVBUF, &(int){ RCVBUF }, sizeof(int)))
			wl_die("SO_RCVBUF");
		for (int i = 0; i < MESSAGES; i++)
			sock_send(sv[1], 2, i);
		if (type != SOCK_DGRAM && shutdown(sv[1], SHUT_WR))
			wl_die("shutdown");
		tree_ready();
		wl_sleep(WL_WINDOW_S);
		tree_check_place();
		if (stream)
			sock_expect_stream(sv[1], 1, MESSAGES, "child");
		else
			for (int i = 0; i < MESSAGES; i++)
				sock_expect(sv[1], 1, i, "child");
		WL_CHECK(!getsockopt(sv[1], SOL_SOCKET, SO_RCVBUF, &rcvbuf, &len)
			 && rcvbuf == 2 * RCVBUF, "child: SO_RCVBUF is %d", rcvbuf);
		sock_expect_peer(sv[1], getppid(), "the pair");
		WL_CHECK(recv(sv[1], &c, 1, 0) == 1 && c == '!', "child: the last message is lost");
		sock_expect_empty(sv[1], "child");
		tree_exit();
	}
	close(sv[1]);
	for (int i = 0; i < MESSAGES; i++)
		sock_send(sv[0], 1, i);
	if (fcntl(sv[0], F_SETFL, O_NONBLOCK))
		wl_die("O_NONBLOCK");
	tree_wait_ready(1);
	wl_sleep(WL_WINDOW_S);
	tree_check_place();
	WL_CHECK(fcntl(sv[0], F_GETFL) & O_NONBLOCK, "parent: O_NONBLOCK is lost");
	sock_expect_peer(sv[0], getpid(), "the pair");
	if (stream)
		sock_expect_stream(sv[0], 2, MESSAGES, "parent");
	else
		for (int i = 0; i < MESSAGES; i++)
			sock_expect(sv[0], 2, i, "parent");
	if (type == SOCK_DGRAM)
		sock_expect_empty(sv[0], "parent");
	else
		WL_CHECK(recv(sv[0], &c, 1, 0) == 0, "parent: no end of file after the data");
	WL_CHECK(send(sv[0], "!", 1, 0) == 1, "parent: send after the window: %s",
		 strerror(errno));
	tree_reap(child, "child");
	return wl_finish();
usage:
	fprintf(stderr, "usage: sock_pair stream|seqpacket|dgram\n");
	return 2;
}
