/*
 * A deleted file held open for reading and writing whose mode no longer allows either.
 *
 * usage: ghost_modes DIR
 *
 * Opens DIR/ghost.dat read-write, writes "before" into it, fchmod()s it to 0 and unlinks it.
 * After the window: the descriptor still reads "before", can write "after" and read it back,
 * and fstat() shows mode 0 and no link.
 */
#include "wl.h"

#include <fcntl.h>
#include <sys/stat.h>

int main(int argc, char **argv)
{
	char path[4096], buf[16] = "";
	struct stat st;
	int fd;

	if (argc != 2)
		wl_die("usage: ghost_modes DIR");
	snprintf(path, sizeof(path), "%s/ghost.dat", argv[1]);
	fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (fd < 0 || pwrite(fd, "before", 6, 0) != 6 || fchmod(fd, 0) || unlink(path))
		wl_die("the ghost file");
	wl_ready();

	wl_sleep(WL_WINDOW_S);

	WL_CHECK(pread(fd, buf, 6, 0) == 6 && !memcmp(buf, "before", 6), "read \"%s\"", buf);
	WL_CHECK(pwrite(fd, "after", 5, 6) == 5, "write: %s", strerror(errno));
	WL_CHECK(pread(fd, buf, 5, 6) == 5 && !memcmp(buf, "after", 5), "read back \"%s\"", buf);
	WL_CHECK(!fstat(fd, &st) && (st.st_mode & 07777) == 0 && st.st_nlink == 0,
		 "mode %o, %lu links", st.st_mode & 07777, (unsigned long)st.st_nlink);
	return wl_finish();
}
