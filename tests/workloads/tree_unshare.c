/*
 * A child in a namespace of its own, as a container started inside a job would be: hpccr must
 * refuse to dump it (it would come back in the restorer's namespace).
 *
 * usage: tree_unshare
 *
 * The child moves to a new UTS namespace (unshare, as root) and names its host "inside"; after
 * the window it checks that its host name is still "inside" and the root's is not.
 */
#include "tree.h"

#include <sched.h>

int main(void)
{
	char name[64] = "";
	pid_t child;

	tree_start();
	child = tree_fork("child");
	if (child == 0) {
		if (unshare(CLONE_NEWUTS) || sethostname("inside", 6))
			wl_die("unshare");
		tree_ready();
		wl_sleep(WL_WINDOW_S);
		tree_check_place();
		WL_CHECK(!gethostname(name, sizeof(name)) && !strcmp(name, "inside"),
			 "the host name is '%s'", name);
		tree_exit();
	}
	tree_wait_ready(1);
	wl_sleep(WL_WINDOW_S);
	tree_check_place();
	WL_CHECK(!gethostname(name, sizeof(name)) && strcmp(name, "inside"),
		 "the root's host name became '%s'", name);
	tree_reap(child, "child");
	return wl_finish();
}
