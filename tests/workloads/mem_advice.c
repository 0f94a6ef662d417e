/*
 * The madvise state, mlock and NUMA policy of mappings, and what a shared file mapping may
 * become.
 *
 * usage: mem_advice DIR
 *
 * Eight anonymous regions of 256 KiB, each with data: MADV_DONTFORK, MADV_WIPEONFORK,
 * MADV_DONTDUMP, MADV_HUGEPAGE, MADV_NOHUGEPAGE, mlock, mlock2(MLOCK_ONFAULT), and one that
 * mbind() binds to node 0; one interleaved on node 0.  DIR/shared.dat opened read-write and
 * mapped shared but read-only.  4 MiB at a 2 MiB boundary advised MADV_HUGEPAGE before they are
 * written.  After the window: each region's VmFlags (smaps) have its flag, the data is there,
 * get_mempolicy() gives the policies back, the shared mapping can be made writable (mprotect)
 * and written through to the file, and the 4 MiB have huge pages again if they had some before
 * (the restore advises before it writes).
 */
#include "wl.h"

#include <fcntl.h>
#include <sys/mman.h>

#define SIZE (256 << 10)
#define MPOL_BIND 2
#define MPOL_INTERLEAVE 3
#define MPOL_F_ADDR 2
#define HUGE_SIZE (4 << 20)
#define HUGE_ALIGN (2 << 20)

enum { DONTFORK, WIPEONFORK, DONTDUMP, HUGEPAGE, NOHUGEPAGE, LOCK, LOCKONFAULT, BIND,
       INTERLEAVE, REGIONS };
static const char *flag[REGIONS] = { "dc", "wf", "dd", "hg", "nh", "lo", "lf", NULL, NULL };
static char *region[REGIONS];

/* Has the VMA holding `addr` the VmFlags flag `want`? */
static int has_flag(void *addr, const char *want)
{
	char line[1024], key[64];
	unsigned long start, end;
	int in = 0, found = 0;
	FILE *f = fopen("/proc/self/smaps", "r");

	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f)) {
		if (sscanf(line, "%lx-%lx ", &start, &end) == 2 && strchr(line, '-') < strchr(line, ' '))
			in = start <= (unsigned long)addr && (unsigned long)addr < end;
		else if (in && !strncmp(line, "VmFlags:", 8)) {
			snprintf(key, sizeof(key), " %s", want);
			found = strstr(line, key) != NULL;
		}
	}
	fclose(f);
	return found;
}

/* The kB of transparent huge pages (smaps AnonHugePages) of the VMA holding `addr`. */
static long anon_huge_kb(void *addr)
{
	char line[1024];
	unsigned long start, end;
	long kb = -1;
	int in = 0;
	FILE *f = fopen("/proc/self/smaps", "r");

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f)) {
		if (sscanf(line, "%lx-%lx ", &start, &end) == 2 && strchr(line, '-') < strchr(line, ' '))
			in = start <= (unsigned long)addr && (unsigned long)addr < end;
		else if (in && sscanf(line, "AnonHugePages: %ld kB", &kb) == 1)
			in = 0;
	}
	fclose(f);
	return kb;
}

/* HUGE_SIZE bytes at a HUGE_ALIGN boundary, advised MADV_HUGEPAGE, then written. */
static char *huge_region(void)
{
	char *raw = mmap(NULL, HUGE_SIZE + HUGE_ALIGN, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	char *huge;

	if (raw == MAP_FAILED)
		wl_die("mmap");
	huge = (char *)(((unsigned long)raw + HUGE_ALIGN - 1) & ~(unsigned long)(HUGE_ALIGN - 1));
	if ((huge > raw && munmap(raw, huge - raw)) ||
	    munmap(huge + HUGE_SIZE, raw + HUGE_ALIGN - huge))
		wl_die("munmap");
	if (madvise(huge, HUGE_SIZE, MADV_HUGEPAGE))
		wl_die("madvise");
	wl_fill(huge, HUGE_SIZE, 70);
	return huge;
}

static int policy(void *addr)
{
	int mode = -1;
	unsigned long mask[16] = { 0 };

	if (syscall(SYS_get_mempolicy, &mode, mask, 1024, addr, MPOL_F_ADDR))
		return -1;
	return mode;
}

int main(int argc, char **argv)
{
	static const int advice[] = { MADV_DONTFORK, MADV_WIPEONFORK, MADV_DONTDUMP, MADV_HUGEPAGE,
				      MADV_NOHUGEPAGE };
	unsigned long node0 = 1;
	char path[4096];
	char *shared, *huge;
	long huge_kb;
	int fd;

	if (argc != 2)
		wl_die("usage: mem_advice DIR");
	for (int i = 0; i < REGIONS; i++) {
		region[i] = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
				 -1, 0);
		if (region[i] == MAP_FAILED)
			wl_die("mmap");
		wl_fill(region[i], SIZE, 50 + i);
	}
	for (int i = DONTFORK; i <= NOHUGEPAGE; i++)
		if (madvise(region[i], SIZE, advice[i]))
			wl_die("madvise");
	if (mlock(region[LOCK], SIZE) || mlock2(region[LOCKONFAULT], SIZE, MLOCK_ONFAULT))
		wl_die("mlock");
	if (syscall(SYS_mbind, region[BIND], SIZE, MPOL_BIND, &node0, 64, 0) ||
	    syscall(SYS_mbind, region[INTERLEAVE], SIZE, MPOL_INTERLEAVE, &node0, 64, 0))
		wl_die("mbind");
	snprintf(path, sizeof(path), "%s/shared.dat", argv[1]);
	fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (fd < 0 || ftruncate(fd, 4096))
		wl_die("shared.dat");
	shared = mmap(NULL, 4096, PROT_READ, MAP_SHARED, fd, 0);
	if (shared == MAP_FAILED)
		wl_die("mmap shared.dat");
	close(fd);
	huge = huge_region();
	huge_kb = anon_huge_kb(huge);
	printf("HUGE %ld\n", huge_kb);
	wl_ready();

	wl_sleep(WL_WINDOW_S);

	for (int i = 0; i < REGIONS; i++) {
		WL_CHECK(wl_verify(region[i], SIZE, 50 + i) < 0, "region %d: data differs", i);
		if (flag[i])
			WL_CHECK(has_flag(region[i], flag[i]), "region %d has no VmFlags %s", i, flag[i]);
	}
	WL_CHECK(policy(region[BIND]) == MPOL_BIND, "bound region: policy %d",
		 policy(region[BIND]));
	WL_CHECK(policy(region[INTERLEAVE]) == MPOL_INTERLEAVE, "interleaved region: policy %d",
		 policy(region[INTERLEAVE]));
	if (mprotect(shared, 4096, PROT_READ | PROT_WRITE)) {
		wl_fail("the shared mapping cannot become writable: %s", strerror(errno));
	} else {
		char back[8] = "";

		memcpy(shared, "written", 7);
		msync(shared, 4096, MS_SYNC);
		fd = open(path, O_RDONLY);
		WL_CHECK(fd >= 0 && pread(fd, back, 7, 0) == 7 && !memcmp(back, "written", 7),
			 "the file reads \"%s\"", back);
		close(fd);
	}
	WL_CHECK(wl_verify(huge, HUGE_SIZE, 70) < 0, "the huge page region's data differs");
	WL_CHECK(huge_kb <= 0 || anon_huge_kb(huge) > 0,
		 "the huge page region had %ld kB of huge pages, now %ld", huge_kb,
		 anon_huge_kb(huge));
	return wl_finish();
}
