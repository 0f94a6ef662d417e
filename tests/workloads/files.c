/*
 * Files: descriptors keep their file, flags, offset and sharing; cwd, umask and RLIMIT_NOFILE
 * are kept.
 *
 * usage: files DIR   (the workload makes DIR its cwd and creates its files there)
 *
 * - rw.dat   O_RDWR at offset 12345, dup'd to fd 50 (one open file description: shared offset)
 * - append.log  O_WRONLY|O_APPEND with "first\n" written
 * - ro.dat   O_RDONLY at offset 777
 * - cloexec.dat  O_RDONLY|O_CLOEXEC
 * - ghost.dat  O_RDWR at offset 5000, unlinked: only the descriptor keeps its 100 KiB alive
 * - umask 027, RLIMIT_NOFILE soft limit lowered to 200
 * The set of open descriptors must be exactly the same after the window.
 */
#include "wl.h"

#include <fcntl.h>
#include <limits.h>
#include <sys/resource.h>
#include <sys/stat.h>

#define DATA_SIZE (64 * 1024)
#define GHOST_SIZE (100 * 1024)
#define RW_OFFSET 12345
#define RO_OFFSET 777
#define GHOST_OFFSET 5000
#define DUP_FD 50
#define MAX_FD 1024

static int rw, append, ro, cloexec, ghost;
static char cwd[PATH_MAX];
static struct rlimit nofile;
static char open_before[MAX_FD];

static int create(const char *name, int size, uint64_t seed)
{
	static char buf[GHOST_SIZE];
	int fd = open(name, O_RDWR | O_CREAT | O_TRUNC, 0666);

	if (fd < 0)
		wl_die(name);
	wl_fill(buf, size, seed);
	if (write(fd, buf, size) != size)
		wl_die(name);
	return fd;
}

static void open_fds(char *set)
{
	for (int fd = 0; fd < MAX_FD; fd++)
		set[fd] = fcntl(fd, F_GETFD) != -1;
}

static void setup(const char *dir)
{
	if (chdir(dir) || !getcwd(cwd, sizeof(cwd)))
		wl_die(dir);
	umask(027);
	rw = create("rw.dat", DATA_SIZE, 10);
	if (lseek(rw, RW_OFFSET, SEEK_SET) != RW_OFFSET || fcntl(rw, F_DUPFD, DUP_FD) != DUP_FD)
		wl_die("rw.dat");
	append = open("append.log", O_WRONLY | O_CREAT | O_APPEND, 0666);
	if (append < 0 || write(append, "first\n", 6) != 6)
		wl_die("append.log");
	close(create("ro.dat", DATA_SIZE, 11));
	ro = open("ro.dat", O_RDONLY);
	if (ro < 0 || lseek(ro, RO_OFFSET, SEEK_SET) != RO_OFFSET)
		wl_die("ro.dat");
	cloexec = open("ro.dat", O_RDONLY | O_CLOEXEC);
	if (cloexec < 0)
		wl_die("cloexec");
	ghost = create("ghost.dat", GHOST_SIZE, 12);
	if (lseek(ghost, GHOST_OFFSET, SEEK_SET) != GHOST_OFFSET || unlink("ghost.dat"))
		wl_die("ghost.dat");
	getrlimit(RLIMIT_NOFILE, &nofile);
	nofile.rlim_cur = 200;
	if (setrlimit(RLIMIT_NOFILE, &nofile))
		wl_die("setrlimit");
	open_fds(open_before);
}

static off_t pos(int fd)
{
	return lseek(fd, 0, SEEK_CUR);
}

/* `len` bytes read at the current offset are bytes [at, at+len) of wl_fill(seed). */
static int reads_pattern(int fd, size_t at, size_t len, uint64_t seed)
{
	static char expect[GHOST_SIZE], got[GHOST_SIZE];

	wl_fill(expect, sizeof(expect), seed);
	return read(fd, got, len) == (ssize_t)len && !memcmp(got, expect + at, len);
}

static void check_descriptors(void)
{
	char open_after[MAX_FD], content[64] = "";
	struct stat st;
	int fd;

	open_fds(open_after);
	for (fd = 0; fd < MAX_FD; fd++)
		WL_CHECK(open_before[fd] == open_after[fd], "fd %d is %s open", fd,
			 open_after[fd] ? "now" : "no longer");

	WL_CHECK((fcntl(rw, F_GETFL) & O_ACCMODE) == O_RDWR, "rw.dat is not O_RDWR");
	WL_CHECK(pos(rw) == RW_OFFSET, "rw.dat offset %ld, not %d", (long)pos(rw), RW_OFFSET);
	WL_CHECK(reads_pattern(rw, RW_OFFSET, 100, 10), "rw.dat content differs");
	WL_CHECK(pos(DUP_FD) == RW_OFFSET + 100, "dup'd fd offset %ld, not %d",
		 (long)pos(DUP_FD), RW_OFFSET + 100);
	lseek(DUP_FD, 4242, SEEK_SET);
	WL_CHECK(pos(rw) == 4242, "rw.dat and its dup no longer share their offset");

	WL_CHECK((fcntl(append, F_GETFL) & (O_ACCMODE | O_APPEND)) == (O_WRONLY | O_APPEND),
		 "append.log flags %#x", fcntl(append, F_GETFL));
	WL_CHECK(pos(append) == 6, "append.log offset %ld, not 6", (long)pos(append));
	lseek(append, 0, SEEK_SET);
	WL_CHECK(write(append, "second\n", 7) == 7, "write append.log: %s", strerror(errno));
	fd = open("append.log", O_RDONLY);
	WL_CHECK(fd >= 0 && read(fd, content, sizeof(content)) == 13 &&
		 !memcmp(content, "first\nsecond\n", 13), "append.log holds \"%s\"", content);
	close(fd);

	WL_CHECK((fcntl(ro, F_GETFL) & O_ACCMODE) == O_RDONLY, "ro.dat is not O_RDONLY");
	WL_CHECK(pos(ro) == RO_OFFSET, "ro.dat offset %ld, not %d", (long)pos(ro), RO_OFFSET);
	WL_CHECK(reads_pattern(ro, RO_OFFSET, 1000, 11), "ro.dat content differs");

	WL_CHECK(fcntl(cloexec, F_GETFD) == FD_CLOEXEC, "close-on-exec lost on fd %d", cloexec);
	WL_CHECK(fcntl(rw, F_GETFD) == 0 && fcntl(ro, F_GETFD) == 0,
		 "close-on-exec appeared on rw.dat or ro.dat");

	WL_CHECK(fstat(ghost, &st) == 0 && st.st_nlink == 0 && st.st_size == GHOST_SIZE,
		 "ghost.dat: nlink %ld size %ld", (long)st.st_nlink, (long)st.st_size);
	WL_CHECK(access("ghost.dat", F_OK) != 0, "ghost.dat is back in the directory");
	WL_CHECK(pos(ghost) == GHOST_OFFSET, "ghost.dat offset %ld, not %d", (long)pos(ghost),
		 GHOST_OFFSET);
	lseek(ghost, 0, SEEK_SET);
	WL_CHECK(reads_pattern(ghost, 0, GHOST_SIZE, 12), "ghost.dat content differs");
}

static void check_process(void)
{
	char now[PATH_MAX];
	struct rlimit lim;
	mode_t mask = umask(0);
	struct stat st;
	int fd;

	umask(mask);
	WL_CHECK(getcwd(now, sizeof(now)) && !strcmp(now, cwd), "cwd %s became %s", cwd, now);
	WL_CHECK(mask == 027, "umask 027 became %03o", (unsigned)mask);
	fd = open("created-after.dat", O_WRONLY | O_CREAT, 0666);
	WL_CHECK(fd >= 0 && fstat(fd, &st) == 0 && (st.st_mode & 0777) == 0640,
		 "a new file got mode %03o, not 640", (unsigned)(st.st_mode & 0777));
	close(fd);
	getrlimit(RLIMIT_NOFILE, &lim);
	WL_CHECK(lim.rlim_cur == nofile.rlim_cur && lim.rlim_max == nofile.rlim_max,
		 "RLIMIT_NOFILE %ld/%ld became %ld/%ld", (long)nofile.rlim_cur,
		 (long)nofile.rlim_max, (long)lim.rlim_cur, (long)lim.rlim_max);
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: files DIR\n");
		return 2;
	}
	setup(argv[1]);
	wl_ready();

	wl_sleep(WL_WINDOW_S);

	check_descriptors();
	check_process();
	return wl_finish();
}
