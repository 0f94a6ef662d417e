/*
 * A stopped process, as in a suspended job: the root stops its child with SIGSTOP.
 *
 * usage: tree_stopped
 *
 * The child counts in a loop (a volatile counter in its memory).  Before READY the root sends
 * it SIGSTOP and waits until waitpid(WUNTRACED) reports it stopped.  After the window the child
 * must still be stopped: its state in /proc is T and its counter (read through a shared page)
 * does not move for 0.2 s.  Then the root sends SIGCONT: the counter moves again, and the child
 * ends when the root tells it to, through the same page.
 */
#include "tree.h"

#include <signal.h>
#include <sys/mman.h>

struct shared {
	volatile unsigned long count;
	volatile int stop;
};

static char state_of(pid_t pid)
{
	char path[64], buf[512], *p;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/stat", pid);
	f = fopen(path, "r");
	if (!f || !fgets(buf, sizeof(buf), f))
		wl_die("stat");
	fclose(f);
	p = strrchr(buf, ')');
	return p && p[1] == ' ' ? p[2] : '?';
}

int main(void)
{
	struct shared *sh = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
				 -1, 0);
	unsigned long before;
	pid_t child;
	int status;

	if (sh == MAP_FAILED)
		wl_die("mmap");
	tree_start();
	child = tree_fork("child");
	if (child == 0) {
		tree_ready();
		while (!sh->stop)
			sh->count++;
		tree_check_place();
		tree_exit();
	}
	tree_wait_ready(1);
	while (sh->count < 1000)
		wl_sleep(0.001);
	if (kill(child, SIGSTOP) || waitpid(child, &status, WUNTRACED) != child
	    || !WIFSTOPPED(status))
		wl_die("stop the child");
	wl_sleep(WL_WINDOW_S);
	tree_check_place();
	WL_CHECK(state_of(child) == 'T', "the child is in state %c, not stopped",
		 state_of(child));
	before = sh->count;
	wl_sleep(0.2);
	WL_CHECK(sh->count == before, "the child counted from %lu to %lu while stopped", before,
		 sh->count);
	if (kill(child, SIGCONT))
		wl_die("SIGCONT");
	wl_sleep(0.2);
	WL_CHECK(sh->count > before, "the child does not count after SIGCONT");
	sh->stop = 1;
	tree_reap(child, "child");
	return wl_finish();
}
