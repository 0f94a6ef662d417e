/*
 * Sessions and process groups across a tree.
 *
 * usage: tree_session
 *
 * The root forks "leader", which calls setsid() and forks two children: "grouped", which makes a
 * process group of its own with setpgid(0, 0), and "member", which stays in the leader's group.
 * After the window every process checks that its pid, parent, session and group are the ones it
 * had, and that they still have this shape: the leader leads its session and group, both
 * grandchildren are in the leader's session, grouped leads its own group and member is in the
 * leader's.
 */
#include "tree.h"

__attribute__((noreturn))
static void grandchild(int own_group)
{
	pid_t leader = getppid();

	if (own_group && setpgid(0, 0))
		wl_die("setpgid");
	tree_ready();
	wl_sleep(WL_WINDOW_S);
	tree_check_place();
	WL_CHECK(getsid(0) == leader, "session %d, not the leader's %d", getsid(0), leader);
	if (own_group)
		WL_CHECK(getpgid(0) == getpid(), "group %d, not its own", getpgid(0));
	else
		WL_CHECK(getpgid(0) == leader, "group %d, not the leader's %d", getpgid(0), leader);
	tree_exit();
}

__attribute__((noreturn))
static void leader(void)
{
	pid_t grouped, member;

	if (setsid() < 0)
		wl_die("setsid");
	grouped = tree_fork("grouped");
	if (grouped == 0)
		grandchild(1);
	member = tree_fork("member");
	if (member == 0)
		grandchild(0);
	tree_ready();
	wl_sleep(WL_WINDOW_S);
	tree_check_place();
	WL_CHECK(getsid(0) == getpid(), "session %d: it no longer leads one", getsid(0));
	WL_CHECK(getpgid(0) == getpid(), "group %d: it no longer leads one", getpgid(0));
	tree_reap(grouped, "grouped");
	tree_reap(member, "member");
	tree_exit();
}

int main(void)
{
	pid_t child;

	tree_start();
	child = tree_fork("leader");
	if (child == 0)
		leader();
	tree_wait_ready(3);
	wl_sleep(WL_WINDOW_S);
	tree_check_place();
	tree_reap(child, "leader");
	return wl_finish();
}
