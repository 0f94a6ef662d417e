/*
 * A child in a namespace or a root directory of its own, as a container started inside a job
 * would be: hpccr must refuse to dump it (it would come back in the restorer's).
 *
 * usage: tree_unshare uts|chroot DIR
 *
 * uts: the child moves to a new UTS namespace (unshare, as root) and names its host "inside";
 * after the window it checks that its host name is still "inside" and the root's is not.
 * chroot: the child changes its root directory to DIR, where it finds the file "inside".
 */
#include "tree.h"

#include <sched.h>

int main(int argc, char **argv)
{
	char name[64] = "";
	int uts;
	pid_t child;

	if (argc != 3 || (strcmp(argv[1], "uts") && strcmp(argv[1], "chroot"))) {
		fprintf(stderr, "usage: tree_unshare uts|chroot DIR\n");
		return 2;
	}
	uts = !strcmp(argv[1], "uts");
	tree_start();
	child = tree_fork("child");
	if (child == 0) {
		if (uts && (unshare(CLONE_NEWUTS) || sethostname("inside", 6)))
			wl_die("unshare");
		if (!uts && (chroot(argv[2]) || chdir("/")))
			wl_die("chroot");
		tree_ready();
		wl_sleep(WL_WINDOW_S);
		tree_check_place();
		if (uts)
			WL_CHECK(!gethostname(name, sizeof(name)) && !strcmp(name, "inside"),
				 "the host name is '%s'", name);
		else
			WL_CHECK(!access("/inside", F_OK), "/inside is not there: not chrooted");
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
