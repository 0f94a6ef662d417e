/*
 * signalfd: the signal set and O_NONBLOCK are kept; a signal pending at the checkpoint is read
 * through it afterwards with its sender.
 *
 * SIGUSR1 and SIGUSR2 are blocked; sfd = signalfd({SIGUSR1, SIGUSR2}, SFD_NONBLOCK); SIGUSR1 is
 * sent to ourselves before READY.  After the window: sfd reads exactly that SIGUSR1 (SI_USER,
 * from our pid), then nothing; a new SIGUSR2 is read through it, SIGINT (not in its set) is not.
 */
#include "wl.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/signalfd.h>

static int next_signal(int fd, struct signalfd_siginfo *si)
{
	memset(si, 0, sizeof(*si));
	return read(fd, si, sizeof(*si)) == sizeof(*si) ? (int)si->ssi_signo : -errno;
}

int main(void)
{
	struct signalfd_siginfo si;
	sigset_t set;
	int sfd, got;

	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	sigaddset(&set, SIGUSR2);
	sigaddset(&set, SIGINT);
	if (sigprocmask(SIG_BLOCK, &set, NULL))
		wl_die("sigprocmask");
	sigdelset(&set, SIGINT);
	sfd = signalfd(-1, &set, SFD_NONBLOCK);
	if (sfd < 0 || kill(getpid(), SIGUSR1))
		wl_die("signalfd");
	wl_ready();

	wl_sleep(WL_WINDOW_S);

	WL_CHECK(fcntl(sfd, F_GETFL) & O_NONBLOCK, "the signalfd became blocking");
	got = next_signal(sfd, &si);
	WL_CHECK(got == SIGUSR1, "read %d from the signalfd, not SIGUSR1", got);
	WL_CHECK(si.ssi_code == SI_USER && si.ssi_pid == (uint32_t)wl_pid,
		 "SIGUSR1 came with code %d from pid %u", si.ssi_code, si.ssi_pid);
	got = next_signal(sfd, &si);
	WL_CHECK(got == -EAGAIN, "read %d from the signalfd, not EAGAIN", got);
	kill(getpid(), SIGINT);
	kill(getpid(), SIGUSR2);
	got = next_signal(sfd, &si);
	WL_CHECK(got == SIGUSR2, "read %d from the signalfd, not SIGUSR2", got);
	got = next_signal(sfd, &si);
	WL_CHECK(got == -EAGAIN, "read %d from the signalfd, not EAGAIN (SIGINT is not in its set)",
		 got);
	return wl_finish();
}
