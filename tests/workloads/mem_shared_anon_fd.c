/*
 * A descriptor of shared anonymous memory (opened through /proc/self/map_files) stays the same
 * object as the mapping, on the same kind of file system.
 *
 * 1 MiB MAP_SHARED|MAP_ANONYMOUS with a pattern; fd opened O_RDWR from its map_files link, with
 * its offset moved to 4096.  After the window: fstatfs gives the same f_type as before, the
 * offset is 4096, the pattern is there through both, and a write through either is seen through
 * the other.  (Opening a map_files link needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE: root's
 * programs and checkpointers do this.)
 */
#include "wl.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/vfs.h>

#define SIZE (1 << 20)

int main(void)
{
	char path[128], buf[64];
	unsigned char *mem;
	struct statfs before, after;
	int fd, bad = 0;

	mem = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		wl_die("mmap");
	for (int i = 0; i < SIZE; i++)
		mem[i] = (unsigned char)(i * 7 + 3);
	snprintf(path, sizeof(path), "/proc/self/map_files/%lx-%lx", (unsigned long)mem,
		 (unsigned long)mem + SIZE);
	fd = open(path, O_RDWR);
	if (fd < 0 || fstatfs(fd, &before) || lseek(fd, 4096, SEEK_SET) != 4096)
		wl_die("map_files");
	wl_ready();

	wl_sleep(WL_WINDOW_S);

	WL_CHECK(fstatfs(fd, &after) == 0 && after.f_type == before.f_type,
		 "the descriptor is on file system %#lx now, not %#lx", (long)after.f_type,
		 (long)before.f_type);
	WL_CHECK(lseek(fd, 0, SEEK_CUR) == 4096, "the offset is not 4096");
	for (int i = 0; i < SIZE; i++)
		bad += mem[i] != (unsigned char)(i * 7 + 3);
	WL_CHECK(!bad, "%d bytes of the mapping changed", bad);
	WL_CHECK(pread(fd, buf, 16, 100) == 16 && !memcmp(buf, mem + 100, 16),
		 "the descriptor reads other data than the mapping");
	WL_CHECK(pwrite(fd, "through the fd", 14, 2000) == 14
		 && !memcmp(mem + 2000, "through the fd", 14),
		 "a write through the descriptor is not in the mapping");
	memcpy(mem + 3000, "through memory", 14);
	WL_CHECK(pread(fd, buf, 14, 3000) == 14 && !memcmp(buf, "through memory", 14),
		 "a write to the mapping is not seen through the descriptor");
	return wl_finish();
}
