/*
 * An orphan in a session whose leader exited.
 *
 * usage: tree_orphan [group]
 *
 * The root makes itself a child subreaper and forks "leader", which calls setsid(), forks
 * "orphan" and exits.  The orphan, now the root's child, stays in the dead leader's session and
 * process group.  After the window the orphan checks its place (session and group of a process
 * that no longer exists, the root as its parent) and the root that it is still a subreaper.
 * With "group" the leader only makes a process group of its own (setpgid): the orphan stays in
 * the root's session, in a group whose leader exited.
 */
#include "tree.h"

#include <sys/prctl.h>

int main(int argc, char **argv)
{
	int group_only = argc > 1 && !strcmp(argv[1], "group");
	pid_t leader, orphan;
	int is_subreaper = 0;
	int link[2];

	tree_start();
	if (prctl(PR_SET_CHILD_SUBREAPER, 1) || pipe(link))
		wl_die("setup");
	leader = tree_fork("leader");
	if (leader == 0) {
		pid_t dead = getpid(), session = group_only ? getsid(0) : dead;

		if (group_only ? setpgid(0, 0) : setsid() < 0)
			wl_die("setsid or setpgid");
		orphan = tree_fork("orphan");
		if (orphan == 0) {
			pid_t me = getpid();

			close(link[0]);
			tree_write_all(link[1], &me, sizeof(me));
			close(link[1]);
			while (getppid() == dead) /* wait until the leader is gone */
				usleep(1000);
			tree_ready();
			wl_sleep(WL_WINDOW_S);
			tree_check_place();
			WL_CHECK(getsid(0) == session && getpgid(0) == dead,
				 "session %d and group %d, not %d and the dead leader's %d",
				 getsid(0), getpgid(0), session, dead);
			tree_exit();
		}
		_exit(0);
	}
	close(link[1]);
	if (tree_read_all(link[0], &orphan, sizeof(orphan)) != sizeof(orphan))
		wl_die("read");
	tree_reap(leader, "leader");
	tree_wait_ready(1);
	wl_sleep(WL_WINDOW_S);
	tree_check_place();
	prctl(PR_GET_CHILD_SUBREAPER, &is_subreaper);
	WL_CHECK(is_subreaper, "it is no longer a child subreaper");
	while (waitpid(-1, NULL, 0) > 0 || errno == EINTR)
		; /* the orphan */
	return wl_finish();
}
