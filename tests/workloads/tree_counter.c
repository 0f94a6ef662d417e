/*
 * A counter that must go on where it was: a root printing what its child counts through a pipe.
 *
 * usage: tree_counter STEPS STEP_MS
 *
 * The child writes 0, 1, ... STEPS-1 into the pipe, one every STEP_MS milliseconds; the root
 * prints "COUNT <n>" for each number it receives and checks that each is the one after the last.
 * At end of file it PASSes only if it got all STEPS numbers in order (nothing lost, repeated or
 * restarted) and the child, which checks its own pid and parent, exited 0.  Checkpoints may come
 * at any time once READY is printed.
 */
#include "tree.h"

int main(int argc, char **argv)
{
	uint32_t steps, next = 0, got;
	double step;
	int link[2];
	pid_t child;

	if (argc != 3) {
		fprintf(stderr, "usage: tree_counter STEPS STEP_MS\n");
		return 2;
	}
	steps = strtoul(argv[1], NULL, 10);
	step = atof(argv[2]) / 1000;
	tree_start();
	if (pipe(link))
		wl_die("pipe");
	child = tree_fork("counter");
	if (child == 0) {
		close(link[0]);
		tree_ready();
		for (uint32_t n = 0; n < steps; n++) {
			tree_write_all(link[1], &n, sizeof(n));
			wl_sleep(step);
		}
		tree_check_place();
		tree_exit();
	}
	close(link[1]);
	tree_wait_ready(1);
	while (tree_read_all(link[0], &got, sizeof(got)) == sizeof(got)) {
		printf("COUNT %u\n", got);
		fflush(stdout);
		WL_CHECK(got == next, "got %u where %u was due", got, next);
		next = got + 1;
	}
	WL_CHECK(next == steps, "the count ended at %u, not %u", next, steps);
	tree_check_place();
	tree_reap(child, "counter");
	return wl_finish();
}
