/*
 * FIFOs (named pipes) inside one process: reopened by path, with their unread data.
 *
 * usage: fd_fifo DIR   (creates DIR/fifo, DIR/solo and DIR/lonely)
 *
 * - fifo: read end O_RDONLY|O_NONBLOCK, write end O_WRONLY, 10 KiB of wl_fill() data in it
 * - solo: one O_RDWR descriptor holding "solo"
 * - lonely: two O_WRONLY descriptors (two opens) and no reader: writing fails with EPIPE
 * After the window the data is there and each FIFO still connects its ends.
 */
#include "wl.h"

#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <sys/stat.h>

#define DATA_SIZE (10 * 1024)

int main(int argc, char **argv)
{
	static char data[DATA_SIZE], got[DATA_SIZE];
	char path[PATH_MAX], buf[8] = "";
	int rd, wr, solo, lonely[2], helper;

	if (argc < 2) {
		fprintf(stderr, "usage: fd_fifo DIR\n");
		return 2;
	}
	wl_fill(data, sizeof(data), 7);
	snprintf(path, sizeof(path), "%s/fifo", argv[1]);
	if (mkfifo(path, 0600))
		wl_die(path);
	rd = open(path, O_RDONLY | O_NONBLOCK);
	wr = open(path, O_WRONLY);
	if (rd < 0 || wr < 0 || write(wr, data, DATA_SIZE) != DATA_SIZE)
		wl_die(path);
	snprintf(path, sizeof(path), "%s/solo", argv[1]);
	if (mkfifo(path, 0600))
		wl_die(path);
	solo = open(path, O_RDWR);
	if (solo < 0 || write(solo, "solo", 4) != 4)
		wl_die(path);
	snprintf(path, sizeof(path), "%s/lonely", argv[1]);
	if (mkfifo(path, 0600))
		wl_die(path);
	helper = open(path, O_RDWR); /* a reader while the write ends are opened */
	lonely[0] = open(path, O_WRONLY);
	lonely[1] = open(path, O_WRONLY);
	if (helper < 0 || lonely[0] < 0 || lonely[1] < 0 || close(helper))
		wl_die(path);
	signal(SIGPIPE, SIG_IGN);
	wl_ready();

	wl_sleep(WL_WINDOW_S);

	WL_CHECK((fcntl(rd, F_GETFL) & (O_ACCMODE | O_NONBLOCK)) == (O_RDONLY | O_NONBLOCK),
		 "the read end's flags are %#x", fcntl(rd, F_GETFL));
	WL_CHECK((fcntl(wr, F_GETFL) & (O_ACCMODE | O_NONBLOCK)) == O_WRONLY,
		 "the write end's flags are %#x", fcntl(wr, F_GETFL));
	WL_CHECK(read(rd, got, DATA_SIZE) == DATA_SIZE && !memcmp(got, data, DATA_SIZE),
		 "the FIFO lost its data");
	WL_CHECK(read(rd, buf, 1) == -1 && errno == EAGAIN, "more data than written in the FIFO");
	WL_CHECK(write(wr, "x", 1) == 1 && read(rd, buf, 1) == 1 && buf[0] == 'x',
		 "the FIFO's ends are no longer connected");
	WL_CHECK((fcntl(solo, F_GETFL) & O_ACCMODE) == O_RDWR, "solo is no longer O_RDWR");
	WL_CHECK(read(solo, buf, sizeof(buf)) == 4 && !memcmp(buf, "solo", 4),
		 "solo lost its data");
	for (int i = 0; i < 2; i++)
		WL_CHECK(write(lonely[i], "z", 1) == -1 && errno == EPIPE,
			 "lonely write end %d has a reader", i);
	return wl_finish();
}
