/*
 * The process-tree workloads (tree_*.c), on top of wl.h.
 *
 * The root calls tree_start() before its first fork and makes its children with tree_fork().
 * Every other process, once its own state is set up, calls tree_ready(): it records who and where
 * it is (pid, parent, session, process group) and tells the root through an inherited pipe.  The
 * root calls tree_wait_ready(n) for its n descendants, which records the root in turn and prints
 * PID and READY.  After the window each process calls tree_check_place() and checks its own
 * state.  A child ends with tree_exit(): status 0, or 1 after printing "FAIL <name>: <failure>"
 * on stderr (its stdout may be a pipe of the workload).  The root tree_reap()s its children and
 * returns wl_finish(), so it PASSes only if every process of the tree passed.
 */
#ifndef TREE_H
#define TREE_H

#include "wl.h"

#include <sys/wait.h>

static const char *tree_name = "root";
static int tree_is_root;
static int tree_sync[2] = { -1, -1 };
static pid_t tree_pid, tree_ppid, tree_sid, tree_pgid;

static inline void tree_start(void)
{
	tree_is_root = 1;
	if (pipe(tree_sync))
		wl_die("pipe");
}

/* fork(), stdio flushed first; the child is called `name` in its failure messages. */
static inline pid_t tree_fork(const char *name)
{
	pid_t pid;

	fflush(stdout);
	fflush(stderr);
	pid = fork();
	if (pid < 0)
		wl_die("fork");
	if (pid == 0) {
		tree_name = name;
		tree_is_root = 0;
	}
	return pid;
}

static inline void tree_write_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;

	while (len) {
		ssize_t n = write(fd, p, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			wl_die("write");
		p += n;
		len -= n;
	}
}

/* Read up to `len` bytes, fewer only at end of file. */
static inline size_t tree_read_all(int fd, void *buf, size_t len)
{
	char *p = buf;
	size_t done = 0;

	while (done < len) {
		ssize_t n = read(fd, p + done, len - done);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			wl_die("read");
		if (n == 0)
			break;
		done += n;
	}
	return done;
}

/* Remember who and where this process is. */
static inline void tree_record(void)
{
	tree_pid = getpid();
	tree_ppid = getppid();
	tree_sid = getsid(0);
	tree_pgid = getpgid(0);
}

/* A descendant of the root is set up: record it and tell the root. */
static inline void tree_ready(void)
{
	tree_record();
	tree_write_all(tree_sync[1], "r", 1);
	close(tree_sync[0]);
	close(tree_sync[1]);
}

/* The root: wait until `n` descendants are ready, then record itself and print PID and READY. */
static inline void tree_wait_ready(int n)
{
	char buf[64];

	close(tree_sync[1]);
	if (n > (int)sizeof(buf) || tree_read_all(tree_sync[0], buf, n) != (size_t)n) {
		errno = ECHILD;
		wl_die("a child ended before it was ready");
	}
	close(tree_sync[0]);
	tree_record();
	wl_ready();
}

/* Still the same pid, parent, session and process group.  Not the root's parent: that is whoever
 * started or restored the tree. */
static inline void tree_check_place(void)
{
	WL_CHECK(getpid() == tree_pid, "pid %d became %d", tree_pid, getpid());
	WL_CHECK(tree_is_root || getppid() == tree_ppid, "parent %d became %d", tree_ppid,
		 getppid());
	WL_CHECK(getsid(0) == tree_sid, "session %d became %d", tree_sid, getsid(0));
	WL_CHECK(getpgid(0) == tree_pgid, "process group %d became %d", tree_pgid, getpgid(0));
}

/* Wait for child `pid` (called `name`): it must exit with status 0. */
static inline void tree_reap(pid_t pid, const char *name)
{
	int status;
	pid_t got;

	while ((got = waitpid(pid, &status, 0)) < 0 && errno == EINTR)
		;
	if (got != pid)
		wl_fail("waitpid(%s %d): %s", name, pid, strerror(errno));
	else
		WL_CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0,
			 "%s (pid %d) ended with wait status %#x", name, pid, status);
}

/* A child's end: its verdict is its exit status; a failure is printed first (on stderr). */
__attribute__((noreturn))
static inline void tree_exit(void)
{
	fflush(stdout);
	if (wl_failure[0])
		fprintf(stderr, "FAIL %s: %s\n", tree_name, wl_failure);
	_exit(wl_failure[0] ? 1 : 0);
}

#endif
