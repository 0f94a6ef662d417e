/*
 * A sparse deleted-but-open file, and a sparse memfd: a few pages of data at large offsets.
 *
 * usage: ghost_sparse DIR
 *
 * DIR/sparse.dat gets 64 KiB of data at 0, at 1 GiB and at 3 GiB - 64 KiB (size 3 GiB), is
 * given to another owner (uid 4321, gid 4322: as root) and unlinked; a memfd gets the same
 * data.  After the window: sizes, data, that the holes read as zeros, that each file is still
 * sparse (allocated blocks near the data's size, and SEEK_HOLE finds the hole after the first
 * extent), and the deleted file's owner.
 */
#include "wl.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

#define CHUNK (64 << 10)
#define SIZE (3ULL << 30)
#define OWNER_UID 4321
#define OWNER_GID 4322

static const off_t offsets[] = { 0, 1LL << 30, (3LL << 30) - CHUNK };

static void check(int fd, const char *what)
{
	static char buf[CHUNK], zeros[CHUNK];
	struct stat st;

	for (int i = 0; i < 3; i++) {
		WL_CHECK(pread(fd, buf, CHUNK, offsets[i]) == CHUNK, "%s: read at %lld", what,
			 (long long)offsets[i]);
		WL_CHECK(wl_verify(buf, CHUNK, 100 + i) < 0, "%s: data at %lld differs", what,
			 (long long)offsets[i]);
	}
	WL_CHECK(pread(fd, buf, CHUNK, 2LL << 30) == CHUNK && !memcmp(buf, zeros, CHUNK),
		 "%s: the hole at 2 GiB is not zeros", what);
	WL_CHECK(!fstat(fd, &st) && st.st_size == (off_t)SIZE, "%s: size %lld", what,
		 (long long)st.st_size);
	WL_CHECK(st.st_blocks * 512 < 16 * CHUNK, "%s: %lld bytes allocated, not sparse", what,
		 (long long)st.st_blocks * 512);
	WL_CHECK(lseek(fd, 0, SEEK_HOLE) == CHUNK, "%s: no hole after the first extent", what);
}

int main(int argc, char **argv)
{
	static char buf[CHUNK];
	char path[4096];
	int file, memfd;

	if (argc != 2)
		wl_die("usage: ghost_sparse DIR");
	snprintf(path, sizeof(path), "%s/sparse.dat", argv[1]);
	file = open(path, O_RDWR | O_CREAT | O_TRUNC, 0640);
	memfd = memfd_create("sparse", 0);
	if (file < 0 || memfd < 0)
		wl_die("the files");
	for (int i = 0; i < 3; i++) {
		wl_fill(buf, CHUNK, 100 + i);
		if (pwrite(file, buf, CHUNK, offsets[i]) != CHUNK ||
		    pwrite(memfd, buf, CHUNK, offsets[i]) != CHUNK)
			wl_die("writing");
	}
	if (geteuid() == 0 && fchown(file, OWNER_UID, OWNER_GID))
		wl_die("fchown");
	if (unlink(path))
		wl_die("unlink");
	wl_ready();

	wl_sleep(WL_WINDOW_S);

	check(file, "deleted file");
	if (geteuid() == 0) {
		struct stat st;

		WL_CHECK(!fstat(file, &st) && st.st_uid == OWNER_UID && st.st_gid == OWNER_GID,
			 "deleted file owned by %u:%u", st.st_uid, st.st_gid);
	}
	check(memfd, "memfd");
	return wl_finish();
}
