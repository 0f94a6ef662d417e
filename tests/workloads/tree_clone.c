/*
 * A child that shares its parent's address space and signal handlers without being a thread.
 *
 * usage: tree_clone sighand|linuxthreads
 *
 * sighand: the child, made with clone(CLONE_VM | CLONE_SIGHAND), waits for the window and exits
 * 0; the parent checks that it did (hpccr must refuse this one and leave both running).
 * linuxthreads: the child is made as LinuxThreads made its threads, clone(CLONE_VM | CLONE_FS |
 * CLONE_FILES | CLONE_SIGHAND), and waits in the shared memory.  After the window the parent
 * installs a SIGUSR1 handler and lets the child go on: the child sends itself SIGUSR1 (the
 * handler must run, in the child), duplicates a descriptor (it must show in the parent's table)
 * and writes a value; the parent must see all three, then reaps the child.  The child uses raw
 * system calls only: it shares the parent's thread pointer, so libc's per-thread state is not
 * its own.
 */
#define _GNU_SOURCE
#include "wl.h"

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/wait.h>

static char stack[1 << 16];
static volatile int phase, child_fd = -1;
static volatile long handled_by, child_pid_seen, child_ppid_seen;

static int waiting_child(void *arg)
{
	(void)arg;
	wl_sleep(WL_WINDOW_S);
	return 0;
}

static void on_usr1(int sig)
{
	(void)sig;
	handled_by = syscall(SYS_getpid);
}

static int linuxthreads_child(void *arg)
{
	struct timespec pause = { 0, 10 * 1000 * 1000 };

	(void)arg;
	phase = 1;
	while (phase != 2)
		syscall(SYS_nanosleep, &pause, NULL);
	child_pid_seen = syscall(SYS_getpid);
	child_ppid_seen = syscall(SYS_getppid);
	syscall(SYS_kill, child_pid_seen, SIGUSR1);
	child_fd = syscall(SYS_dup, 1);
	phase = 3;
	return 0;
}

int main(int argc, char **argv)
{
	int flags, status, linuxthreads;
	double deadline;
	pid_t pid;

	if (argc < 2 || (strcmp(argv[1], "sighand") && strcmp(argv[1], "linuxthreads")))
		goto usage;
	linuxthreads = !strcmp(argv[1], "linuxthreads");
	flags = CLONE_VM | CLONE_SIGHAND;
	if (linuxthreads)
		flags |= CLONE_FS | CLONE_FILES;
	pid = clone(linuxthreads ? linuxthreads_child : waiting_child, stack + sizeof(stack),
		    flags | SIGCHLD, NULL);
	if (pid < 0)
		wl_die("clone");
	while (linuxthreads && phase != 1)
		wl_sleep(0.01);
	wl_ready();
	wl_sleep(WL_WINDOW_S);
	if (linuxthreads) {
		signal(SIGUSR1, on_usr1);
		phase = 2;
		deadline = wl_now() + 10;
		while (phase != 3 && wl_now() < deadline)
			wl_sleep(0.01);
		WL_CHECK(phase == 3, "the child did not go on after the window");
		WL_CHECK(child_pid_seen == pid && child_ppid_seen == getpid(),
			 "the child is %ld, child of %ld, not %d of %d", child_pid_seen,
			 child_ppid_seen, pid, getpid());
		WL_CHECK(handled_by == pid, "SIGUSR1 of the child was handled by %ld", handled_by);
		WL_CHECK(child_fd >= 0 && fcntl(child_fd, F_GETFD) >= 0,
			 "the child's descriptor %d is not in the parent's table", child_fd);
	}
	WL_CHECK(waitpid(pid, &status, __WALL) == pid && WIFEXITED(status) && !WEXITSTATUS(status),
		 "the clone child failed (status %#x)", status);
	return wl_finish();
usage:
	fprintf(stderr, "usage: tree_clone sighand|linuxthreads\n");
	return 2;
}
