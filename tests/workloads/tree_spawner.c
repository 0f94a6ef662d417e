/*
 * A root that runs short-lived children all the time, as a job script running commands does:
 * checkpoints catch children while they end.
 *
 * usage: tree_spawner SECONDS | tree_spawner FILE
 *
 * After READY the root goes on for SECONDS (or until FILE exists, checked after every child)
 * starting children one after another, reaping each
 * and checking its status: forked ones that exit with their number (mod 128) after a few
 * hundred microseconds, and `true` run with posix_spawn (vfork and exec); then it runs 10 more,
 * and PASSes if every child ended as it should.  A restore continues the
 * loop where the checkpoint caught it, zombie child included.
 */
#include "tree.h"

#include <spawn.h>

extern char **environ;
static long children;

static void run_child(void)
{
	char *argv[] = { "true", NULL };
	int want = children % 2 ? 0 : children % 128, status;
	pid_t pid;

	if (children % 2) {
		errno = posix_spawnp(&pid, "true", NULL, NULL, argv, environ);
		if (errno)
			wl_die("posix_spawnp");
	} else {
		pid = tree_fork("child");
		if (pid == 0) {
			wl_sleep(0.0001 * (children % 7));
			_exit(want);
		}
	}
	while (waitpid(pid, &status, 0) < 0)
		if (errno != EINTR) {
			wl_fail("waitpid(%d) for child %ld: %s", pid, children, strerror(errno));
			return;
		}
	WL_CHECK(WIFEXITED(status) && WEXITSTATUS(status) == want,
		 "child %ld ended with wait status %#x", children, status);
	children++;
}

int main(int argc, char **argv)
{
	const char *stop = NULL;
	double until = 0;

	if (argc != 2) {
		fprintf(stderr, "usage: tree_spawner SECONDS | tree_spawner FILE\n");
		return 2;
	}
	if (argv[1][0] == '/')
		stop = argv[1];
	else
		until = atof(argv[1]);
	tree_start();
	tree_wait_ready(0);
	until += wl_now();
	while ((stop ? access(stop, F_OK) != 0 : wl_now() < until) && !wl_failure[0])
		run_child();
	tree_check_place();
	for (int i = 0; i < 10; i++)
		run_child();
	printf("children %ld\n", children);
	return wl_finish();
}
