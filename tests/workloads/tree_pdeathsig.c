/*
 * A child with a parent-death signal (PR_SET_PDEATHSIG), which it must still have after the
 * restore, also as an ordinary user (a change of credentials clears it in the kernel).
 *
 * The child sets SIGUSR1 as its parent-death signal and waits out the window; then it checks
 * PR_GET_PDEATHSIG and reports through its exit status, which the parent checks.
 */
#include "wl.h"

#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>

int main(void)
{
	int status, sig = -1;
	pid_t child = fork();

	if (child < 0)
		wl_die("fork");
	if (child == 0) {
		if (prctl(PR_SET_PDEATHSIG, SIGUSR1))
			_exit(2);
		wl_sleep(WL_WINDOW_S + 0.5);
		_exit(prctl(PR_GET_PDEATHSIG, &sig) || sig != SIGUSR1 ? 3 : 0);
	}
	wl_ready();

	wl_sleep(WL_WINDOW_S);

	WL_CHECK(waitpid(child, &status, 0) == child && WIFEXITED(status) && !WEXITSTATUS(status),
		 "the child lost its parent-death signal (status %#x)", status);
	return wl_finish();
}
