/*
 * A process group whose leader has exited: the later commands of a pipeline outlive the first.
 *
 * usage: tree_lost_group
 *
 * The root forks "first", which makes a group of its own (the root does the same setpgid, as a
 * shell does), then "second", which it puts in first's group; second forks "third", in that
 * group too.  first exits and is reaped before READY.  After the window second and third are
 * still in first's group (tree_check_place), and a signal the root sends to the group reaches
 * both of them.
 */
#include "tree.h"

#include <signal.h>

static int gate[2];  /* first ends when the root closes it: only first and the root hold it */

/* The group's signal (blocked since the root's start) comes within 10 s. */
static void group_signal_came(void)
{
	struct timespec limit = { .tv_sec = 10 };
	sigset_t usr1;

	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	WL_CHECK(sigtimedwait(&usr1, NULL, &limit) == SIGUSR1,
		 "the signal sent to the group did not come: %s", strerror(errno));
}

__attribute__((noreturn))
static void third(void)
{
	tree_ready();
	wl_sleep(WL_WINDOW_S);
	tree_check_place();
	group_signal_came();
	tree_exit();
}

__attribute__((noreturn))
static void second(pid_t group)
{
	pid_t child;

	close(gate[0]);
	close(gate[1]);
	if (setpgid(0, group))
		wl_die("setpgid");
	child = tree_fork("third");
	if (child == 0)
		third();
	tree_ready();
	wl_sleep(WL_WINDOW_S);
	tree_check_place();
	group_signal_came();
	tree_reap(child, "third");
	tree_exit();
}

int main(void)
{
	pid_t first, later;
	sigset_t usr1;
	char c;

	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	if (sigprocmask(SIG_BLOCK, &usr1, NULL) || pipe(gate))
		wl_die("setup");
	tree_start();
	first = tree_fork("first");
	if (first == 0) {
		close(gate[1]);
		if (setpgid(0, 0))
			wl_die("setpgid");
		read(gate[0], &c, 1);  /* until the root lets it end */
		_exit(0);
	}
	if (setpgid(first, first) && errno != EACCES)
		wl_die("setpgid first");
	later = tree_fork("second");
	if (later == 0)
		second(first);
	if (setpgid(later, first) && errno != EACCES)
		wl_die("setpgid second");
	close(gate[0]);
	close(gate[1]);
	tree_reap(first, "first");
	tree_wait_ready(2);
	wl_sleep(WL_WINDOW_S);
	tree_check_place();
	WL_CHECK(kill(-first, SIGUSR1) == 0, "kill(-%d): %s", first, strerror(errno));
	tree_reap(later, "second");
	return wl_finish();
}
