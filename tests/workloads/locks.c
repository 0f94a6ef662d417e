/*
 * File locks held across a checkpoint: an flock(2) lock on an open file description shared with
 * a child, POSIX record locks (fcntl) on byte ranges, and an OFD lock.
 *
 * usage: locks DIR
 *
 * Before READY the root takes LOCK_EX on DIR/flock and forks "child", which inherits that
 * description; it takes a POSIX write lock on bytes 10..19 and a read lock from byte 30 to the
 * end of DIR/posix, which it also maps (a restore opens and closes the files it maps again,
 * which must not drop the locks), and an OFD write lock on DIR/ofd.  After the window a probe process (a new
 * child) must find each held: its own LOCK_EX|LOCK_NB on DIR/flock fails, F_GETLK on DIR/posix
 * reports the root's write lock on 10..19, its read lock from 30 and nothing on 20..29, and
 * F_OFD_GETLK reports the OFD write lock, and fdinfo names the root as the flock lock's taker.  Then the child unlocks its copy of the flock
 * description and exits: a second probe takes the flock lock at once, since root and child
 * held it through one description.
 */
#include "tree.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>

static char flock_path[4096], posix_path[4096], ofd_path[4096];

/* The root makes each file (100 bytes); the probes only open them. */
static int open_file(const char *path)
{
	int fd = open(path, O_RDWR);

	if (fd < 0)
		wl_die("open");
	return fd;
}

static int make_file(const char *path)
{
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);

	if (fd < 0 || ftruncate(fd, 100))
		wl_die("create");
	return fd;
}

static void set_lock(int fd, int cmd, short type, off_t start, off_t len)
{
	struct flock fl = { .l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len };

	if (fcntl(fd, cmd, &fl))
		wl_die("fcntl lock");
}

/* What F_GETLK (or F_OFD_GETLK) says about a write lock wanted on start..start+len-1. */
static struct flock get_lock(int fd, int cmd, off_t start, off_t len)
{
	struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = start, .l_len = len };

	if (fcntl(fd, cmd, &fl))
		wl_die("fcntl getlk");
	return fl;
}

static void probe_held(pid_t root)
{
	int fd = open_file(flock_path);
	struct flock fl;

	WL_CHECK(flock(fd, LOCK_EX | LOCK_NB) < 0 && errno == EWOULDBLOCK,
		 "the flock lock is not held");
	close(fd);
	fd = open_file(posix_path);
	fl = get_lock(fd, F_GETLK, 10, 10);
	WL_CHECK(fl.l_type == F_WRLCK && fl.l_pid == root && fl.l_start == 10 && fl.l_len == 10,
		 "bytes 10..19: lock type %d by %d on %ld+%ld", fl.l_type, fl.l_pid,
		 (long)fl.l_start, (long)fl.l_len);
	fl = get_lock(fd, F_GETLK, 40, 1);
	WL_CHECK(fl.l_type == F_RDLCK && fl.l_pid == root && fl.l_start == 30 && fl.l_len == 0,
		 "byte 40: lock type %d by %d on %ld+%ld", fl.l_type, fl.l_pid, (long)fl.l_start,
		 (long)fl.l_len);
	fl = get_lock(fd, F_GETLK, 20, 10);
	WL_CHECK(fl.l_type == F_UNLCK, "bytes 20..29 are locked (type %d)", fl.l_type);
	close(fd);
	fd = open_file(ofd_path);
	fl = get_lock(fd, F_OFD_GETLK, 0, 0);
	WL_CHECK(fl.l_type == F_WRLCK && fl.l_pid == -1, "the OFD lock: type %d pid %d", fl.l_type,
		 fl.l_pid);
	close(fd);
}

static void probe_free(void)
{
	int fd = open_file(flock_path);

	WL_CHECK(!flock(fd, LOCK_EX | LOCK_NB), "the flock lock is still held after the child "
		 "unlocked its copy of the description: %s", strerror(errno));
	close(fd);
}

static void probe(const char *name, pid_t root, int held)
{
	pid_t pid = tree_fork(name);

	if (pid == 0) {
		if (held)
			probe_held(root);
		else
			probe_free();
		tree_exit();
	}
	tree_reap(pid, name);
}

/* fdinfo names the process that took the flock lock: this one, after a restore too. */
static void check_flock_holder(int fd)
{
	char path[64], line[256];
	int holder = -1;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", fd);
	f = fopen(path, "r");
	while (f && fgets(line, sizeof(line), f))
		if (strstr(line, "FLOCK"))
			sscanf(strstr(line, "WRITE") ? strstr(line, "WRITE") + 5 : line, "%d", &holder);
	if (f)
		fclose(f);
	WL_CHECK(holder == getpid(), "the flock lock names pid %d, not %d", holder, getpid());
}

int main(int argc, char **argv)
{
	int flock_fd, posix_fd, ofd_fd, go[2];
	pid_t child;
	char word;

	if (argc != 2) {
		fprintf(stderr, "usage: locks DIR\n");
		return 2;
	}
	snprintf(flock_path, sizeof(flock_path), "%s/flock", argv[1]);
	snprintf(posix_path, sizeof(posix_path), "%s/posix", argv[1]);
	snprintf(ofd_path, sizeof(ofd_path), "%s/ofd", argv[1]);
	flock_fd = make_file(flock_path);
	if (flock(flock_fd, LOCK_EX) || pipe(go))
		wl_die("flock");
	tree_start();
	child = tree_fork("child");
	if (child == 0) {
		tree_ready();
		wl_sleep(WL_WINDOW_S);
		tree_check_place();
		while (read(go[0], &word, 1) < 0 && errno == EINTR)
			;
		if (flock(flock_fd, LOCK_UN))
			wl_fail("LOCK_UN: %s", strerror(errno));
		tree_exit();
	}
	posix_fd = make_file(posix_path);
	set_lock(posix_fd, F_SETLK, F_WRLCK, 10, 10);
	set_lock(posix_fd, F_SETLK, F_RDLCK, 30, 0);
	if (mmap(NULL, 100, PROT_READ, MAP_SHARED, posix_fd, 0) == MAP_FAILED)
		wl_die("mmap");
	ofd_fd = make_file(ofd_path);
	set_lock(ofd_fd, F_OFD_SETLK, F_WRLCK, 0, 0);
	tree_wait_ready(1);
	wl_sleep(WL_WINDOW_S);
	tree_check_place();
	check_flock_holder(flock_fd);
	probe("probe", getpid(), 1);
	tree_write_all(go[1], "u", 1);
	tree_reap(child, "child");
	probe("second probe", getpid(), 0);
	return wl_finish();
}
