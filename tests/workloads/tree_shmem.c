/*
 * A root and three children counting in one MAP_SHARED|MAP_ANONYMOUS page, under process-shared
 * mutexes.
 *
 * usage: tree_shmem
 *
 * All four processes add ROUNDS to the shared counter (and each to its own slot), one locked
 * increment at a time, before READY.  The root holds a second shared mutex, the gate, through the
 * window; the children wait on it (in futex_wait, in another process's hands; they give up
 * GATE_S seconds after the window) and, once the root lets them through, all four add ROUNDS
 * more.  The root PASSes only if the counter is exactly 4 * ROUNDS after the window and
 * 8 * ROUNDS at the end, and every child's slot shows its 2 * ROUNDS increments: memory that is
 * no longer shared, or a mutex that no longer excludes, loses some.
 */
#include "tree.h"

#include <sys/mman.h>

#define PROCS 4
#define ROUNDS 50000
#define GATE_S 20 /* how long after the window a child waits for the gate before failing */

struct shared {
	pthread_mutex_t lock; /* guards counter and mine[] */
	pthread_mutex_t gate; /* held by the root through the window */
	volatile long counter;
	volatile long mine[PROCS];
};

static struct shared *shared;

static void add(int who)
{
	for (long i = 0; i < ROUNDS; i++) {
		pthread_mutex_lock(&shared->lock);
		long seen = shared->counter;

		shared->mine[who]++;
		shared->counter = seen + 1;
		pthread_mutex_unlock(&shared->lock);
	}
}

__attribute__((noreturn))
static void child(int who)
{
	struct timespec deadline;
	int err;

	clock_gettime(CLOCK_REALTIME, &deadline);
	deadline.tv_sec += WL_WINDOW_S + GATE_S;
	add(who);
	tree_ready();
	err = pthread_mutex_timedlock(&shared->gate, &deadline);
	if (err) {
		wl_fail("the root did not open the gate (%s): is the memory still shared?",
			strerror(err));
		tree_exit();
	}
	pthread_mutex_unlock(&shared->gate);
	tree_check_place();
	add(who);
	WL_CHECK(shared->mine[who] == 2 * ROUNDS, "its slot holds %ld, not %d", shared->mine[who],
		 2 * ROUNDS);
	tree_exit();
}

int main(void)
{
	static const char *names[PROCS] = { "root", "c1", "c2", "c3" };
	pthread_mutexattr_t attr;
	pid_t pids[PROCS];

	shared = mmap(NULL, sizeof(*shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
		      -1, 0);
	if (shared == MAP_FAILED)
		wl_die("mmap");
	pthread_mutexattr_init(&attr);
	if (pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED))
		wl_die("pthread_mutexattr_setpshared");
	pthread_mutex_init(&shared->lock, &attr);
	pthread_mutex_init(&shared->gate, &attr);
	pthread_mutex_lock(&shared->gate);
	tree_start();
	for (int who = 1; who < PROCS; who++) {
		pids[who] = tree_fork(names[who]);
		if (pids[who] == 0)
			child(who);
	}
	add(0);
	tree_wait_ready(PROCS - 1);
	wl_sleep(WL_WINDOW_S);
	tree_check_place();
	WL_CHECK(shared->counter == PROCS * ROUNDS, "counter %ld after the window, not %d",
		 shared->counter, PROCS * ROUNDS);
	pthread_mutex_unlock(&shared->gate);
	add(0);
	for (int who = 1; who < PROCS; who++)
		tree_reap(pids[who], names[who]);
	WL_CHECK(shared->counter == 2 * PROCS * ROUNDS, "counter %ld at the end, not %d",
		 shared->counter, 2 * PROCS * ROUNDS);
	for (int who = 0; who < PROCS; who++)
		WL_CHECK(shared->mine[who] == 2 * ROUNDS, "the root sees %ld increments of %s, not %d",
			 shared->mine[who], names[who], 2 * ROUNDS);
	return wl_finish();
}
