/*
 * A pseudo-terminal held by this process, both ends, as Open MPI's mpirun holds its ranks'
 * output: the slave wrote lines the master has not read yet.
 *
 * usage: fd_pty
 *
 * Opens a pair, turns ECHO off, sets VINTR to ^G and a window size of 42x132 on it, writes two
 * lines to the slave (output processing turns "\n" into "\r\n"), prints READY.  After the window
 * the master reads exactly those bytes, the settings and window size are unchanged, and a line
 * written to the slave then reaches the master (still one pair).
 */
#include "wl.h"

#include <fcntl.h>
#include <pty.h>
#include <sys/ioctl.h>
#include <termios.h>

static void expect(int master, const char *want)
{
	char buf[256];
	size_t len = strlen(want), got = 0;

	while (got < len) {
		ssize_t n = read(master, buf + got, len - got);

		if (n <= 0)
			break;
		got += n;
	}
	WL_CHECK(got == len && !memcmp(buf, want, len), "the master read %zu bytes, not '%s'", got,
		 want);
}

int main(void)
{
	struct termios t;
	struct winsize ws = { .ws_row = 42, .ws_col = 132 };
	int master, slave, pending;

	if (openpty(&master, &slave, NULL, NULL, &ws) || tcgetattr(slave, &t))
		wl_die("openpty");
	t.c_lflag &= ~ECHO;
	t.c_cc[VINTR] = 7;
	if (tcsetattr(slave, TCSANOW, &t) || write(slave, "hello\nworld\n", 12) != 12)
		wl_die("pty setup");
	wl_ready();
	wl_sleep(WL_WINDOW_S);
	WL_CHECK(!ioctl(master, FIONREAD, &pending) && pending == 14,
		 "%d bytes wait for the master, not 14", pending);
	expect(master, "hello\r\nworld\r\n");
	memset(&t, 0, sizeof(t));
	memset(&ws, 0, sizeof(ws));
	if (tcgetattr(slave, &t) || ioctl(master, TIOCGWINSZ, &ws))
		wl_die("tcgetattr");
	WL_CHECK(!(t.c_lflag & ECHO) && t.c_cc[VINTR] == 7 && (t.c_oflag & OPOST),
		 "the terminal settings changed");
	WL_CHECK(ws.ws_row == 42 && ws.ws_col == 132, "the window is %dx%d", ws.ws_row,
		 ws.ws_col);
	if (write(slave, "again\n", 6) != 6)
		wl_die("write");
	expect(master, "again\r\n");
	return wl_finish();
}
