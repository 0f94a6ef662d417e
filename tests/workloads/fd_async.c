/*
 * Signal-driven I/O (O_ASYNC): whom a descriptor signals, and with which signal, are kept.
 *
 * usage: fd_async
 *
 * A pipe's read end signals the process (F_SETOWN) with SIGUSR1 (F_SETSIG); one end of a
 * socketpair signals the main thread (F_SETOWN_EX, F_OWNER_TID) with the default SIGIO.  After
 * the window both still have O_ASYNC, their owner and signal; a byte written into each brings
 * SIGUSR1 with si_fd the pipe's read end, then SIGIO.
 */
#include "wl.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>

static volatile sig_atomic_t usr1_fd = -1, sigio_count;

static void on_usr1(int sig, siginfo_t *info, void *ctx)
{
	(void)sig;
	(void)ctx;
	usr1_fd = info->si_fd;
}

static void on_sigio(int sig)
{
	(void)sig;
	sigio_count++;
}

static void wait_for(volatile sig_atomic_t *what, int value)
{
	double deadline = wl_now() + 5;

	while (*what != value && wl_now() < deadline)
		wl_sleep(0.01);
}

int main(void)
{
	struct sigaction sa = { .sa_sigaction = on_usr1, .sa_flags = SA_SIGINFO | SA_RESTART };
	struct f_owner_ex owner = { .type = F_OWNER_TID, .pid = getpid() };
	int p[2], s[2];

	sigaction(SIGUSR1, &sa, NULL);
	signal(SIGIO, on_sigio);
	if (pipe(p) || socketpair(AF_UNIX, SOCK_STREAM, 0, s))
		wl_die("pipe");
	if (fcntl(p[0], F_SETOWN, getpid()) || fcntl(p[0], F_SETSIG, SIGUSR1)
	    || fcntl(p[0], F_SETFL, O_ASYNC | O_NONBLOCK))
		wl_die("pipe O_ASYNC");
	if (fcntl(s[0], F_SETOWN_EX, &owner) || fcntl(s[0], F_SETFL, O_ASYNC))
		wl_die("socket O_ASYNC");
	wl_ready();
	wl_sleep(WL_WINDOW_S);

	WL_CHECK(fcntl(p[0], F_GETFL) & O_ASYNC, "the pipe lost O_ASYNC");
	WL_CHECK(fcntl(p[0], F_GETOWN) == getpid(), "the pipe's owner is %d",
		 fcntl(p[0], F_GETOWN));
	WL_CHECK(fcntl(p[0], F_GETSIG) == SIGUSR1, "the pipe's signal is %d",
		 fcntl(p[0], F_GETSIG));
	owner.pid = 0;
	WL_CHECK(!fcntl(s[0], F_GETOWN_EX, &owner) && owner.type == F_OWNER_TID
		 && owner.pid == getpid(), "the socket's owner is %d (type %d)", owner.pid,
		 owner.type);
	if (write(p[1], "x", 1) != 1)
		wl_die("write");
	wait_for(&usr1_fd, p[0]);
	WL_CHECK(usr1_fd == p[0], "no SIGUSR1 for the pipe (si_fd %d)", (int)usr1_fd);
	if (write(s[1], "x", 1) != 1)
		wl_die("write");
	wait_for(&sigio_count, 1);
	WL_CHECK(sigio_count == 1, "%d SIGIO for the socket", (int)sigio_count);
	return wl_finish();
}
