/*
 * Files under /proc of the tree's own processes, held open.
 *
 * usage: tree_procfiles [outside PID]
 *
 * The root forks "child", then opens /proc/self/stat (read to its end: the offset is past 0),
 * /proc/<child>/fd (a directory) and /proc/<child>/maps, and a thread of its own opens
 * /proc/thread-self/comm (that is /proc/<root>/task/<tid>/comm).  The child maps one page named by
 * its address.  After the window the root checks that /proc/self/stat is at its old offset and,
 * read again from 0, names the root, that the fd directory lists the child's
 * descriptors, that the maps hold the child's page and that the thread's comm is "procthread".
 * With "outside PID" the root only holds /proc/PID/stat of a process outside the tree (which a
 * dump refuses) and checks nothing else.
 */
#include "tree.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/prctl.h>

static char page_line[64];
static int comm_fd = -1, thread_ready;

static void *thread_main(void *arg)
{
	(void)arg;
	prctl(PR_SET_NAME, "procthread");
	comm_fd = open("/proc/thread-self/comm", O_RDONLY);
	__atomic_store_n(&thread_ready, 1, __ATOMIC_SEQ_CST);
	pause();
	return NULL;
}

static ssize_t read_all(int fd, char *buf, size_t size)
{
	ssize_t n, done = 0;

	while ((n = read(fd, buf + done, size - 1 - done)) > 0)
		done += n;
	buf[done] = 0;
	return n < 0 ? -1 : done;
}

static void check_stat(int fd, off_t offset)
{
	char buf[4096], mine[32];

	WL_CHECK(lseek(fd, 0, SEEK_CUR) == offset, "/proc/self/stat: offset %ld, not %ld",
		 (long)lseek(fd, 0, SEEK_CUR), (long)offset);
	WL_CHECK(lseek(fd, 0, SEEK_SET) == 0 && read_all(fd, buf, sizeof(buf)) > 0,
		 "/proc/self/stat: cannot read it again from 0");
	snprintf(mine, sizeof(mine), "%d (", getpid());
	WL_CHECK(!strncmp(buf, mine, strlen(mine)), "/proc/self/stat names another process: %.40s",
		 buf);
}

static void check_fd_dir(int fd, pid_t child)
{
	DIR *dir = fdopendir(dup(fd));
	struct dirent *d;
	int entries = 0;

	if (!dir) {
		wl_fail("/proc/%d/fd: %s", child, strerror(errno));
		return;
	}
	rewinddir(dir);
	while ((d = readdir(dir)))
		entries += d->d_name[0] != '.';
	closedir(dir);
	WL_CHECK(entries >= 3, "/proc/%d/fd lists %d descriptors", child, entries);
}

int main(int argc, char **argv)
{
	char path[64], buf[1 << 16];
	int stat_fd, fd_dir, maps_fd, link[2];
	off_t stat_offset;
	pthread_t thread;
	pid_t child;

	if (argc == 3 && !strcmp(argv[1], "outside")) {
		snprintf(path, sizeof(path), "/proc/%s/stat", argv[2]);
		if (open(path, O_RDONLY) < 0)
			wl_die(path);
		wl_ready();
		wl_sleep(WL_WINDOW_S);
		return wl_finish();
	}
	tree_start();
	if (pipe(link))
		wl_die("pipe");
	child = tree_fork("child");
	if (child == 0) {
		char *page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
				  -1, 0);

		if (page == MAP_FAILED)
			wl_die("mmap");
		page[0] = 1;
		tree_write_all(link[1], &page, sizeof(page));
		tree_ready();
		wl_sleep(WL_WINDOW_S + 1);
		tree_exit();
	}
	{
		char *page;

		if (tree_read_all(link[0], &page, sizeof(page)) != sizeof(page))
			wl_die("read");
		snprintf(page_line, sizeof(page_line), "%lx-", (unsigned long)page);
	}
	stat_fd = open("/proc/self/stat", O_RDONLY);
	snprintf(path, sizeof(path), "/proc/%d/fd", child);
	fd_dir = open(path, O_RDONLY | O_DIRECTORY);
	snprintf(path, sizeof(path), "/proc/%d/maps", child);
	maps_fd = open(path, O_RDONLY);
	if (stat_fd < 0 || fd_dir < 0 || maps_fd < 0 || read_all(stat_fd, buf, sizeof(buf)) <= 0)
		wl_die("opening /proc files");
	stat_offset = lseek(stat_fd, 0, SEEK_CUR);
	if (pthread_create(&thread, NULL, thread_main, NULL))
		wl_die("pthread_create");
	while (!__atomic_load_n(&thread_ready, __ATOMIC_SEQ_CST))
		usleep(1000);
	if (comm_fd < 0)
		wl_die("/proc/thread-self/comm");
	tree_wait_ready(1);
	wl_sleep(WL_WINDOW_S);
	tree_check_place();
	check_stat(stat_fd, stat_offset);
	check_fd_dir(fd_dir, child);
	WL_CHECK(read_all(maps_fd, buf, sizeof(buf)) > 0 && strstr(buf, page_line),
		 "/proc/%d/maps: no line for the child's page %s", child, page_line);
	WL_CHECK(read_all(comm_fd, buf, sizeof(buf)) > 0 && !strcmp(buf, "procthread\n"),
		 "/proc/thread-self/comm: \"%s\"", buf);
	tree_reap(child, "child");
	return wl_finish();
}
