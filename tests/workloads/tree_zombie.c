/*
 * Zombies: children that ended and that the root has not reaped yet.
 *
 * usage: tree_zombie
 *
 * The root forks "exited", which exits with status 42, and "killed", which dies of SIGUSR2, and
 * waits until both have ended without reaping them (waitid with WNOWAIT).  After the window it
 * reaps each with waitpid(WNOHANG), which must return that pid at once with its own wait status,
 * and then finds no child left.
 */
#include "tree.h"

#include <signal.h>

static void wait_ended(pid_t pid)
{
	siginfo_t info;

	while (waitid(P_PID, pid, &info, WEXITED | WNOWAIT) < 0)
		if (errno != EINTR)
			wl_die("waitid");
}

static void reap(pid_t pid, const char *name, int want)
{
	int status = 0;
	pid_t got = waitpid(pid, &status, WNOHANG);

	WL_CHECK(got == pid, "waitpid(%s %d, WNOHANG) gave %d: it is no longer a zombie child", name,
		 pid, got);
	WL_CHECK(got != pid || status == want, "%s ended with wait status %#x, not %#x", name, status,
		 want);
}

int main(void)
{
	pid_t exited, killed;

	tree_start();
	exited = tree_fork("exited");
	if (exited == 0)
		_exit(42);
	killed = tree_fork("killed");
	if (killed == 0) {
		signal(SIGUSR2, SIG_DFL);
		raise(SIGUSR2);
		_exit(99);
	}
	wait_ended(exited);
	wait_ended(killed);
	tree_wait_ready(0);
	wl_sleep(WL_WINDOW_S);
	tree_check_place();
	reap(exited, "exited", 42 << 8);
	reap(killed, "killed", SIGUSR2);
	WL_CHECK(waitpid(-1, NULL, WNOHANG) < 0 && errno == ECHILD, "a child is left after both");
	return wl_finish();
}
