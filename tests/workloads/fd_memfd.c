/*
 * memfd: descriptors of memfds come back as memfds, with their name, content, size, offset,
 * flags and seals; a memfd that is also mapped shared stays one object with its mappings.
 *
 * usage: fd_memfd [future]
 *
 * - sealed: MFD_ALLOW_SEALING, SEALED_LEN bytes of wl_fill data, then F_SEAL_SHRINK|F_SEAL_GROW|
 *   F_SEAL_WRITE; close-on-exec, the offset in the middle; also mapped shared, read-only
 * - plain: made without MFD_ALLOW_SEALING (the kernel seals it F_SEAL_SEAL), O_APPEND, a short
 *   text with the offset at its end
 * - future: sealed F_SEAL_FUTURE_WRITE, not mapped
 * - noexec: MFD_NOEXEC_SEAL (Linux 6.3; skipped before): mode 0666, sealed F_SEAL_EXEC
 * - shared: SHARED_LEN bytes, sealed F_SEAL_SHRINK, mapped shared and writable by the root and by a child that closed
 *   its descriptor (it reaches the memfd only through its mapping).  After the window the root
 *   writes through its descriptor and the child must see that in its mapping; the child answers
 *   through its mapping and the root must read that through its descriptor.
 * With `future`: only one memfd, mapped shared and writable and then sealed F_SEAL_FUTURE_WRITE;
 * after the window its mapping must still be writable, and the seal still forbid writes through
 * the descriptor and a new writable shared mapping.
 */
#include "tree.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010
#endif
#ifndef F_SEAL_EXEC
#define F_SEAL_EXEC 0x0020
#endif
#ifndef MFD_NOEXEC_SEAL
#define MFD_NOEXEC_SEAL 0x0008U
#endif

#define SEALED_LEN 10000
#define SEALED_POS 4321
#define SEALED_SEED 0x5ea1
#define SEALED_SEALS (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE)
#define PLAIN_TEXT "plain memfd, no sealing allowed\n"
#define FUTURE_TEXT "sealed for future writes\n"
#define SHARED_LEN (3 * 4096)
#define SHARED_DATA (2 * 4096) /* wl_fill data; the messages go after it */
#define SHARED_POS 5000
#define SHARED_SEED 0x5a4ed
#define ROOT_AT (SHARED_DATA + 100)
#define CHILD_AT (SHARED_DATA + 200)
#define ROOT_SAYS "written by the root through its descriptor"
#define CHILD_SAYS "written by the child through its mapping"
#define WAIT_S 10 /* how long after the window each side waits for the other's message */

static int make(const char *name, unsigned int flags)
{
	int fd = memfd_create(name, flags);

	if (fd < 0)
		wl_die("memfd_create");
	return fd;
}

static void *map(int fd, size_t len, int prot)
{
	void *p = mmap(NULL, len, prot, MAP_SHARED, fd, 0);

	if (p == MAP_FAILED)
		wl_die("mmap");
	return p;
}

/* Name, seals, size, offset, flags, close-on-exec, owner and mode of memfd `fd`. */
static void check_memfd(int fd, const char *name, int seals, off_t size, off_t pos, int flags,
			int cloexec, mode_t mode)
{
	char path[64], link[256], want[256];
	struct stat st;
	ssize_t n;

	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	snprintf(want, sizeof(want), "/memfd:%s (deleted)", name);
	n = readlink(path, link, sizeof(link) - 1);
	link[n < 0 ? 0 : n] = '\0';
	WL_CHECK(strcmp(link, want) == 0, "fd %d is '%s', not '%s'", fd, link, want);
	WL_CHECK(fcntl(fd, F_GET_SEALS) == seals, "%s: seals %#x, not %#x", name,
		 fcntl(fd, F_GET_SEALS), seals);
	WL_CHECK(fstat(fd, &st) == 0 && st.st_size == size, "%s: size %lld, not %lld", name,
		 (long long)st.st_size, (long long)size);
	WL_CHECK(st.st_uid == geteuid() && st.st_gid == getegid(), "%s: owned by %d:%d", name,
		 st.st_uid, st.st_gid);
	WL_CHECK((st.st_mode & 07777) == mode, "%s: mode %#o, not %#o", name, st.st_mode & 07777,
		 mode);
	WL_CHECK(lseek(fd, 0, SEEK_CUR) == pos, "%s: offset %lld, not %lld", name,
		 (long long)lseek(fd, 0, SEEK_CUR), (long long)pos);
	WL_CHECK((fcntl(fd, F_GETFL) & (O_ACCMODE | O_APPEND | O_NONBLOCK)) == flags,
		 "%s: flags %#o, not %#o", name, fcntl(fd, F_GETFL), flags);
	WL_CHECK(!(fcntl(fd, F_GETFD) & FD_CLOEXEC) == !cloexec, "%s: close-on-exec %s", name,
		 cloexec ? "lost" : "gained");
}

static int has_text(int fd, off_t at, const char *text)
{
	char buf[128];
	size_t len = strlen(text);

	return pread(fd, buf, len, at) == (ssize_t)len && memcmp(buf, text, len) == 0;
}

/* Wait up to WAIT_S seconds after the window for `text` at `p`. */
static int wait_for_text(const volatile char *p, const char *text)
{
	double deadline = wl_now() + WL_WINDOW_S + WAIT_S;

	while (wl_now() < deadline) {
		if (memcmp((const char *)p, text, strlen(text)) == 0)
			return 1;
		usleep(10000);
	}
	return 0;
}

__attribute__((noreturn))
static void child(char *shared)
{
	tree_ready();
	WL_CHECK(wait_for_text(shared + ROOT_AT, ROOT_SAYS),
		 "the root's write through its descriptor never showed in the mapping");
	tree_check_place();
	WL_CHECK(wl_verify(shared, SHARED_DATA, SHARED_SEED) < 0, "its mapping lost the data");
	memcpy(shared + CHILD_AT, CHILD_SAYS, strlen(CHILD_SAYS));
	tree_exit();
}

static int future_only(void)
{
	int fd = make("hpccr future mapped", MFD_ALLOW_SEALING);
	char *p;

	if (ftruncate(fd, 4096))
		wl_die("ftruncate");
	p = map(fd, 4096, PROT_READ | PROT_WRITE);
	if (fcntl(fd, F_ADD_SEALS, F_SEAL_FUTURE_WRITE))
		wl_die("F_ADD_SEALS");
	wl_ready();

	wl_sleep(WL_WINDOW_S);

	memcpy(p, FUTURE_TEXT, strlen(FUTURE_TEXT));
	WL_CHECK(has_text(fd, 0, FUTURE_TEXT), "the writable mapping is not the memfd's");
	WL_CHECK(write(fd, "x", 1) < 0 && errno == EPERM, "the memfd can be written");
	WL_CHECK(mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) == MAP_FAILED
		 && errno == EPERM, "a new writable shared mapping of the memfd is allowed");
	return wl_finish();
}

int main(int argc, char **argv)
{
	static char data[SEALED_LEN];
	int sealed, plain, future, noexec, shared_fd;
	char *sealed_map, *shared;
	pid_t pid;

	if (argc > 1 && strcmp(argv[1], "future") == 0)
		return future_only();

	sealed = make("hpccr sealed", MFD_ALLOW_SEALING | MFD_CLOEXEC);
	wl_fill(data, SEALED_LEN, SEALED_SEED);
	tree_write_all(sealed, data, SEALED_LEN);
	if (fcntl(sealed, F_ADD_SEALS, SEALED_SEALS) || lseek(sealed, SEALED_POS, SEEK_SET) < 0)
		wl_die("sealing");
	sealed_map = map(sealed, SEALED_LEN, PROT_READ);

	plain = make("hpccr plain", 0);
	tree_write_all(plain, PLAIN_TEXT, strlen(PLAIN_TEXT));
	if (fcntl(plain, F_SETFL, O_APPEND))
		wl_die("F_SETFL");

	future = make("hpccr future", MFD_ALLOW_SEALING | MFD_CLOEXEC);
	tree_write_all(future, FUTURE_TEXT, strlen(FUTURE_TEXT));
	if (fcntl(future, F_ADD_SEALS, F_SEAL_FUTURE_WRITE))
		wl_die("F_ADD_SEALS");

	noexec = memfd_create("hpccr noexec", MFD_NOEXEC_SEAL);
	if (noexec < 0 && errno != EINVAL)
		wl_die("memfd_create MFD_NOEXEC_SEAL");

	shared_fd = make("hpccr shared", MFD_ALLOW_SEALING | MFD_CLOEXEC);
	if (ftruncate(shared_fd, SHARED_LEN) || lseek(shared_fd, SHARED_POS, SEEK_SET) < 0 ||
	    fcntl(shared_fd, F_ADD_SEALS, F_SEAL_SHRINK))
		wl_die("ftruncate");
	shared = map(shared_fd, SHARED_LEN, PROT_READ | PROT_WRITE);
	wl_fill(shared, SHARED_DATA, SHARED_SEED);

	tree_start();
	pid = tree_fork("child");
	if (pid == 0) {
		close(shared_fd);
		child(shared);
	}
	tree_wait_ready(1);

	wl_sleep(WL_WINDOW_S);

	tree_check_place();
	check_memfd(sealed, "hpccr sealed", SEALED_SEALS, SEALED_LEN, SEALED_POS, O_RDWR, 1,
		    0777);
	WL_CHECK(pread(sealed, data, SEALED_LEN, 0) == SEALED_LEN &&
		 wl_verify(data, SEALED_LEN, SEALED_SEED) < 0, "sealed: content lost");
	WL_CHECK(wl_verify(sealed_map, SEALED_LEN, SEALED_SEED) < 0, "sealed: mapping lost");
	WL_CHECK(write(sealed, "x", 1) < 0 && errno == EPERM, "sealed: it can be written");
	WL_CHECK(ftruncate(sealed, 1) < 0 && errno == EPERM, "sealed: it can shrink");

	check_memfd(plain, "hpccr plain", F_SEAL_SEAL, strlen(PLAIN_TEXT), strlen(PLAIN_TEXT),
		    O_RDWR | O_APPEND, 0, 0777);
	WL_CHECK(has_text(plain, 0, PLAIN_TEXT), "plain: content lost");
	WL_CHECK(fcntl(plain, F_ADD_SEALS, F_SEAL_WRITE) < 0 && errno == EPERM,
		 "plain: it can be sealed");
	WL_CHECK(lseek(plain, 0, SEEK_SET) == 0 && write(plain, "!", 1) == 1 &&
		 lseek(plain, 0, SEEK_CUR) == (off_t)strlen(PLAIN_TEXT) + 1,
		 "plain: no longer appends");

	check_memfd(future, "hpccr future", F_SEAL_FUTURE_WRITE, strlen(FUTURE_TEXT),
		    strlen(FUTURE_TEXT), O_RDWR, 1, 0777);
	WL_CHECK(has_text(future, 0, FUTURE_TEXT), "future: content lost");
	WL_CHECK(write(future, "x", 1) < 0 && errno == EPERM, "future: it can be written");

	if (noexec >= 0) {
		check_memfd(noexec, "hpccr noexec", F_SEAL_EXEC, 0, 0, O_RDWR, 0, 0666);
		WL_CHECK(fchmod(noexec, 0777) < 0 && errno == EPERM, "noexec: it can become executable");
	}

	check_memfd(shared_fd, "hpccr shared", F_SEAL_SHRINK, SHARED_LEN, SHARED_POS, O_RDWR, 1,
		    0777);
	WL_CHECK(pread(shared_fd, data, SHARED_DATA, 0) == SHARED_DATA &&
		 wl_verify(data, SHARED_DATA, SHARED_SEED) < 0, "shared: content lost");
	WL_CHECK(pwrite(shared_fd, ROOT_SAYS, strlen(ROOT_SAYS), ROOT_AT) ==
		 (ssize_t)strlen(ROOT_SAYS), "shared: pwrite failed");
	WL_CHECK(memcmp(shared + ROOT_AT, ROOT_SAYS, strlen(ROOT_SAYS)) == 0,
		 "shared: its own write through the descriptor is not in its mapping");
	tree_reap(pid, "child");
	WL_CHECK(has_text(shared_fd, CHILD_AT, CHILD_SAYS),
		 "shared: the child's write through its mapping is not in the memfd");
	return wl_finish();
}
