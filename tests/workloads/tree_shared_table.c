/*
 * A child made with clone(CLONE_FILES), clone(CLONE_FILES | CLONE_FS) or clone(CLONE_FS)
 * shares its parent's descriptor table and/or its cwd and umask without being a thread.  After
 * the window they must share exactly that still: with the table, a descriptor the child opens
 * is in the parent's table and one the parent closes is gone for the child (without it, the
 * opposite); with cwd and umask, the child's chdir and umask are the parent's too (without
 * them the parent's stay as they were).
 *
 * usage: tree_shared_table files|fs|fsonly    (files: CLONE_FILES, fs: both, fsonly: CLONE_FS)
 */
#define _GNU_SOURCE
#include "wl.h"

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>

#define KEPT_FD 42   /* open in both, stays */
#define CLOSED_FD 43 /* open in both, closed by the parent after the window */
#define START_DIR "/tmp"

struct shared {
	volatile int step;     /* parent -> child: 1 open and chdir, 2 look for CLOSED_FD */
	volatile int done;     /* child -> parent: the last step it finished */
	volatile int child_fd; /* what the child opened in step 1 */
	char failure[256];
};

static struct shared *sh;
static int with_fs, with_files;
static char stack[1 << 16];

/* The parent waits at most 10 s for the child; the child as long as the parent lives (it may
 * be checkpointed and restored meanwhile). */
static int wait_for(volatile int *value, int want)
{
	double deadline = wl_now() + 10;

	while (*value != want)
		if (wl_now() > deadline)
			return 0;
	return 1;
}

static int wait_for_parent(volatile int *value, int want, pid_t parent)
{
	while (*value != want)
		if (getppid() != parent)
			return 0;
	return 1;
}

static int child(void *arg)
{
	pid_t parent = *(pid_t *)arg;

	if (!wait_for_parent(&sh->step, 1, parent))
		_exit(1);
	if (fcntl(KEPT_FD, F_GETFD) == -1)
		snprintf(sh->failure, sizeof(sh->failure), "child: fd %d is gone", KEPT_FD);
	sh->child_fd = open("/dev/null", O_RDONLY);
	if (with_fs) {
		if (chdir("/"))
			snprintf(sh->failure, sizeof(sh->failure), "child: chdir failed");
		umask(077);
	}
	sh->done = 1;
	if (!wait_for_parent(&sh->step, 2, parent))
		_exit(1);
	if ((fcntl(CLOSED_FD, F_GETFD) != -1) == with_files)
		snprintf(sh->failure, sizeof(sh->failure), "child: fd %d, closed by the parent, is "
			 "%s", CLOSED_FD, with_files ? "still open" : "closed for the child too");
	sh->done = 2;
	_exit(0);
}

int main(int argc, char **argv)
{
	char cwd[256];
	int flags = 0, fd, status;
	mode_t mask;
	pid_t pid, self = getpid();

	if (argc < 2 || (strcmp(argv[1], "files") && strcmp(argv[1], "fs") &&
			  strcmp(argv[1], "fsonly"))) {
		fprintf(stderr, "usage: tree_shared_table files|fs|fsonly\n");
		return 2;
	}
	with_files = strcmp(argv[1], "fsonly") != 0;
	with_fs = strcmp(argv[1], "files") != 0;
	if (with_files)
		flags |= CLONE_FILES;
	if (with_fs)
		flags |= CLONE_FS;
	sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (sh == MAP_FAILED)
		wl_die("mmap");
	fd = open("/dev/null", O_RDONLY);
	if (fd < 0 || dup2(fd, KEPT_FD) < 0 || dup2(fd, CLOSED_FD) < 0 || close(fd))
		wl_die("descriptors");
	if (chdir(START_DIR))
		wl_die("chdir");
	umask(022);
	pid = clone(child, stack + sizeof(stack), flags | SIGCHLD, &self);
	if (pid < 0)
		wl_die("clone");
	wl_ready();

	wl_sleep(WL_WINDOW_S);
	sh->step = 1;
	WL_CHECK(wait_for(&sh->done, 1), "the child did not answer");
	WL_CHECK(sh->child_fd >= 0 && (fcntl(sh->child_fd, F_GETFD) != -1) == with_files,
		 "fd %d, opened by the child, is %s the parent's table", sh->child_fd,
		 with_files ? "not in" : "in");
	WL_CHECK(getcwd(cwd, sizeof(cwd)) && !strcmp(cwd, with_fs ? "/" : START_DIR),
		 "the parent's cwd is %s", cwd);
	mask = umask(0);
	WL_CHECK(mask == (with_fs ? 077 : 022), "the parent's umask is %03o", mask);
	close(CLOSED_FD);
	sh->step = 2;
	WL_CHECK(wait_for(&sh->done, 2), "the child did not answer twice");
	WL_CHECK(!sh->failure[0], "%s", sh->failure);
	WL_CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && !WEXITSTATUS(status),
		 "the child failed (status %#x)", status);
	return wl_finish();
}
