/*
 * A program started from a shell (`./sim &`, `nohup ./sim &`): its session, and its process group
 * unless the shell has job control, are led by the shell, outside the tree.
 *
 * usage: tree_shell_job
 *
 * The root forks "member", which stays in the root's group.  The root prints "GROUP LED" if it
 * leads its group at READY.  After the window the root prints "PLACE <session> <group>" for the
 * test (a restore puts it in the restorer's session, and group unless it led its own), and every
 * process checks its pid and parent, that it leads no session, and the shape: the root leads its
 * group if and only if it did, and member is in the root's session and group.
 */
#include "tree.h"

__attribute__((noreturn))
static void member(void)
{
	tree_ready();
	wl_sleep(WL_WINDOW_S);
	WL_CHECK(getpid() == tree_pid, "pid %d became %d", tree_pid, getpid());
	WL_CHECK(getppid() == tree_ppid, "parent %d became %d", tree_ppid, getppid());
	WL_CHECK(getsid(0) == getsid(tree_ppid), "session %d, not its parent's %d", getsid(0),
		 getsid(tree_ppid));
	WL_CHECK(getpgid(0) == getpgid(tree_ppid), "group %d, not its parent's %d", getpgid(0),
		 getpgid(tree_ppid));
	tree_exit();
}

int main(void)
{
	pid_t child;
	int led_group;

	tree_start();
	child = tree_fork("member");
	if (child == 0)
		member();
	led_group = getpgid(0) == getpid();
	if (led_group)
		printf("GROUP LED\n");
	tree_wait_ready(1);
	wl_sleep(WL_WINDOW_S);
	WL_CHECK(getpid() == tree_pid, "pid %d became %d", tree_pid, getpid());
	WL_CHECK(getsid(0) != getpid(), "it leads a session of its own");
	WL_CHECK((getpgid(0) == getpid()) == led_group, "it %s its group",
		 led_group ? "no longer leads" : "now leads");
	printf("PLACE %d %d\n", getsid(0), getpgid(0));
	tree_reap(child, "member");
	return wl_finish();
}
