/*
 * One open file description shared by a root and its child (inherited across fork, no
 * O_APPEND): the offset moves for both.
 *
 * usage: tree_offset FILE
 *
 * FILE is made of 64-byte records.  Before READY the root writes "root 0", forks, and the child
 * writes "child 0" through the same descriptor.  After the window the root writes "root 1" and
 * checks its offset, then tells the child through a pipe; the child, which has waited for that,
 * finds the file holding "root 1", expects its own offset to have moved past it and writes
 * "child 1"; the root reaps the child, expects its offset past that one and writes "root 2".
 * Both check the offset after each write and that O_APPEND is still off.  The root PASSes only if
 * the file then holds exactly root 0, child 0, root 1, child 1, root 2: with two descriptions
 * instead of one, a write lands on another.
 */
#include "tree.h"

#include <fcntl.h>
#include <sys/stat.h>

#define RECORD 64
#define RECORDS 5

static const char *expected[RECORDS] = { "root 0", "child 0", "root 1", "child 1", "root 2" };
static int fd;
static int root_wrote[2];

static void check_offset(int records, const char *when)
{
	off_t at = lseek(fd, 0, SEEK_CUR);

	WL_CHECK(at == records * RECORD, "offset %ld %s, not %d", (long)at, when, records * RECORD);
}

static void write_record(int index)
{
	char record[RECORD + 1];

	snprintf(record, sizeof(record), "%-*s\n", RECORD - 1, expected[index]);
	tree_write_all(fd, record, RECORD);
	check_offset(index + 1, "after its write");
}

/* Wait for the root's word that it wrote and checked its record, then for the file to hold it. */
static void wait_for_root(int records)
{
	struct stat st;
	char word;

	while (read(root_wrote[0], &word, 1) < 0 && errno == EINTR)
		;
	WL_CHECK(fstat(fd, &st) == 0 && st.st_size >= records * RECORD,
		 "the file does not hold %d bytes", records * RECORD);
}

static void check_file(const char *path)
{
	char data[RECORDS * RECORD + 1], record[RECORD + 1];
	int in = open(path, O_RDONLY);
	size_t n;

	if (in < 0)
		wl_die("open");
	n = tree_read_all(in, data, sizeof(data));
	close(in);
	WL_CHECK(n == RECORDS * RECORD, "the file holds %zu bytes, not %d", n, RECORDS * RECORD);
	for (int i = 0; i < RECORDS && (size_t)(i + 1) * RECORD <= n; i++) {
		snprintf(record, sizeof(record), "%-*s\n", RECORD - 1, expected[i]);
		WL_CHECK(!memcmp(data + i * RECORD, record, RECORD), "record %d is not '%s'", i,
			 expected[i]);
	}
}

int main(int argc, char **argv)
{
	pid_t child;

	if (argc != 2) {
		fprintf(stderr, "usage: tree_offset FILE\n");
		return 2;
	}
	fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0)
		wl_die("open");
	write_record(0);
	if (pipe(root_wrote))
		wl_die("pipe");
	tree_start();
	child = tree_fork("child");
	if (child == 0) {
		write_record(1);
		tree_ready();
		wl_sleep(WL_WINDOW_S);
		tree_check_place();
		WL_CHECK(!(fcntl(fd, F_GETFL) & O_APPEND), "O_APPEND is on");
		wait_for_root(3);
		check_offset(3, "after the root's write");
		write_record(3);
		tree_exit();
	}
	tree_wait_ready(1);
	wl_sleep(WL_WINDOW_S);
	tree_check_place();
	WL_CHECK(!(fcntl(fd, F_GETFL) & O_APPEND), "O_APPEND is on");
	check_offset(2, "after the window");
	write_record(2);
	tree_write_all(root_wrote[1], "w", 1);
	tree_reap(child, "child");
	check_offset(4, "after the child's second write");
	write_record(4);
	check_file(argv[1]);
	return wl_finish();
}
