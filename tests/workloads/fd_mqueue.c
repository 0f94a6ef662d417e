/*
 * POSIX message queues.
 *
 * usage: fd_mqueue NAME
 *
 * Opens the queue /NAME (made: 8 messages of 128 bytes at most, mode 0640) for reading, and
 * again for writing with O_NONBLOCK, and sends "one" (priority 1), "five" (5) and "two" (1);
 * then makes the queue /NAME-gone (4 x 32 bytes), sends "gone" (3) into it and unlinks it.
 * After the window: the attributes (sizes, message counts, O_NONBLOCK on the write end), the
 * messages in the queue's order with their priorities (five, one, two; gone), the unlinked queue
 * still without a name; then /NAME is unlinked.
 */
#include "wl.h"

#include <fcntl.h>
#include <mqueue.h>
#include <sys/stat.h>

static void expect(mqd_t q, const char *text, unsigned prio, const char *what)
{
	char buf[128] = "";
	unsigned got = 0;
	ssize_t n = mq_receive(q, buf, sizeof(buf), &got);

	WL_CHECK(n == (ssize_t)strlen(text) && !memcmp(buf, text, n) && got == prio,
		 "%s: got \"%.*s\" (%zd bytes) priority %u, not \"%s\" %u", what,
		 (int)(n > 0 ? n : 0), buf, n, got, text, prio);
}

int main(int argc, char **argv)
{
	struct mq_attr attr = { .mq_maxmsg = 8, .mq_msgsize = 128 }, small = { .mq_maxmsg = 4,
		.mq_msgsize = 32 }, got;
	char name[256], gone_name[300];
	mqd_t rd, wr, gone;

	if (argc != 2)
		wl_die("usage: fd_mqueue NAME");
	snprintf(name, sizeof(name), "/%s", argv[1]);
	snprintf(gone_name, sizeof(gone_name), "/%s-gone", argv[1]);
	rd = mq_open(name, O_RDONLY | O_CREAT | O_EXCL, 0640, &attr);
	wr = mq_open(name, O_WRONLY | O_NONBLOCK);
	gone = mq_open(gone_name, O_RDWR | O_CREAT | O_EXCL, 0600, &small);
	if (rd == (mqd_t)-1 || wr == (mqd_t)-1 || gone == (mqd_t)-1)
		wl_die("mq_open");
	if (mq_send(wr, "one", 3, 1) || mq_send(wr, "five", 4, 5) || mq_send(wr, "two", 3, 1) ||
	    mq_send(gone, "gone", 4, 3) || mq_unlink(gone_name))
		wl_die("mq_send");
	wl_ready();

	wl_sleep(WL_WINDOW_S);

	WL_CHECK(!mq_getattr(wr, &got) && got.mq_maxmsg == 8 && got.mq_msgsize == 128 &&
		 got.mq_curmsgs == 3 && got.mq_flags & O_NONBLOCK,
		 "write end: maxmsg %ld msgsize %ld curmsgs %ld flags %lx", got.mq_maxmsg,
		 got.mq_msgsize, got.mq_curmsgs, got.mq_flags);
	WL_CHECK(!mq_getattr(rd, &got) && !(got.mq_flags & O_NONBLOCK), "read end non-blocking");
	expect(rd, "five", 5, "first");
	expect(rd, "one", 1, "second");
	expect(rd, "two", 1, "third");
	WL_CHECK(!mq_getattr(gone, &got) && got.mq_maxmsg == 4 && got.mq_msgsize == 32 &&
		 got.mq_curmsgs == 1, "unlinked queue: maxmsg %ld msgsize %ld curmsgs %ld",
		 got.mq_maxmsg, got.mq_msgsize, got.mq_curmsgs);
	expect(gone, "gone", 3, "unlinked queue");
	WL_CHECK(mq_open(gone_name, O_RDONLY) == (mqd_t)-1 && errno == ENOENT,
		 "the unlinked queue has a name again");
	mq_unlink(name);
	return wl_finish();
}
