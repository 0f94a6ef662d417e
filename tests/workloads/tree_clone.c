/*
 * A child that shares its parent's signal handlers (and so its address space) without being a
 * thread: hpccr must refuse the dump and leave both running.
 *
 * usage: tree_clone sighand
 *
 * The child, made with clone(CLONE_VM | CLONE_SIGHAND), waits for the window and exits 0; the
 * parent checks that it did.
 */
#define _GNU_SOURCE
#include "wl.h"

#include <sched.h>
#include <signal.h>
#include <sys/wait.h>

static char stack[1 << 16];

static int child(void *arg)
{
	(void)arg;
	wl_sleep(WL_WINDOW_S);
	return 0;
}

int main(int argc, char **argv)
{
	int flags, status;
	pid_t pid;

	if (argc < 2 || strcmp(argv[1], "sighand"))
		goto usage;
	flags = CLONE_VM | CLONE_SIGHAND;
	pid = clone(child, stack + sizeof(stack), flags | SIGCHLD, NULL);
	if (pid < 0)
		wl_die("clone");
	wl_ready();
	wl_sleep(WL_WINDOW_S);
	WL_CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && !WEXITSTATUS(status),
		 "the clone child failed");
	return wl_finish();
usage:
	fprintf(stderr, "usage: tree_clone sighand\n");
	return 2;
}
