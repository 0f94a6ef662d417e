/*
 * A three-level tree connected by pipes, with data in flight.
 *
 * usage: tree_pipes
 *
 * The root forks c1 and c2, and each of them a grandchild (g1, g2).  Every parent writes 64 KiB
 * (a full pipe) into the pipe to its child before READY, and nobody reads before the window is
 * over.  Then every process checks its pid and parent, every parent writes 4 KiB more and closes
 * its end, and every child reads exactly 64 KiB + 4 KiB of the right data, then end of file.
 * c1 and c2 reap their grandchild, the root reaps c1 and c2 and PASSes only if all passed.
 */
#include "tree.h"

#define IN_FLIGHT (64 * 1024)
#define LATER (4 * 1024)

static char buf[IN_FLIGHT + LATER + 1];

/* Fill the pipe to a child: the data in flight during the checkpoint. */
static void send_first(int fd, uint64_t seed)
{
	wl_fill(buf, IN_FLIGHT, seed);
	tree_write_all(fd, buf, IN_FLIGHT);
}

static void send_rest(int fd, uint64_t seed)
{
	wl_fill(buf, LATER, seed + 1);
	tree_write_all(fd, buf, LATER);
	close(fd);
}

static void receive(int fd, uint64_t seed)
{
	size_t n = tree_read_all(fd, buf, sizeof(buf));
	long bad;

	close(fd);
	WL_CHECK(n == IN_FLIGHT + LATER, "read %zu bytes from its parent, not %d then end of file",
		 n, IN_FLIGHT + LATER);
	bad = wl_verify(buf, IN_FLIGHT, seed);
	WL_CHECK(bad < 0, "the data in flight differs at byte %ld", bad);
	bad = wl_verify(buf + IN_FLIGHT, LATER, seed + 1);
	WL_CHECK(bad < 0, "the data written after the window differs at byte %ld", bad);
}

/* A child reading `in` from its parent; with a `grandchild` name, it feeds a child of its own. */
__attribute__((noreturn))
static void child(int in, uint64_t seed, const char *grandchild, uint64_t grandchild_seed)
{
	int out[2] = { -1, -1 };
	pid_t pid = 0;

	if (grandchild) {
		if (pipe(out))
			wl_die("pipe");
		pid = tree_fork(grandchild);
		if (pid == 0) {
			close(in);
			close(out[1]);
			child(out[0], grandchild_seed, NULL, 0);
		}
		close(out[0]);
		send_first(out[1], grandchild_seed);
	}
	tree_ready();
	wl_sleep(WL_WINDOW_S);
	tree_check_place();
	receive(in, seed);
	if (grandchild) {
		send_rest(out[1], grandchild_seed);
		tree_reap(pid, grandchild);
	}
	tree_exit();
}

int main(void)
{
	int a1[2], a2[2];
	pid_t c1, c2;

	tree_start();
	if (pipe(a1))
		wl_die("pipe");
	c1 = tree_fork("c1");
	if (c1 == 0) {
		close(a1[1]);
		child(a1[0], 0x1000, "g1", 0x3000);
	}
	close(a1[0]);
	if (pipe(a2))
		wl_die("pipe");
	c2 = tree_fork("c2");
	if (c2 == 0) {
		close(a1[1]);
		close(a2[1]);
		child(a2[0], 0x2000, "g2", 0x4000);
	}
	close(a2[0]);
	send_first(a1[1], 0x1000);
	send_first(a2[1], 0x2000);
	tree_wait_ready(4);
	wl_sleep(WL_WINDOW_S);
	tree_check_place();
	send_rest(a1[1], 0x1000);
	send_rest(a2[1], 0x2000);
	tree_reap(c1, "c1");
	tree_reap(c2, "c2");
	return wl_finish();
}
