/*
 * Threads born and ending all the time, as in a program whose thread pool grows and shrinks:
 * checkpoints catch threads while they are created (a clone in flight) and while they exit.
 *
 * usage: thread_churn FILE
 *
 * After READY two spawner threads each create a worker thread, join it and check what it
 * returned (a hash of its number, computed on its own stack and heap), over and over, until FILE
 * exists; each spawner then runs 100 more workers.  The main thread waits for the spawners and
 * PASSes if every worker returned what it should.  A restore goes on from where the checkpoint
 * caught the spawners, a worker not yet joined included.
 */
#include "wl.h"

#include <sys/stat.h>

#define SPAWNERS 2
#define AFTER_STOP 100

static const char *stop_file;
static long workers[SPAWNERS];

static uint64_t expected(uint64_t number)
{
	uint64_t state = number * 2 + 1, value = 0;

	for (int i = 0; i < 64; i++)
		value ^= wl_rand(&state);
	return value;
}

static void *worker(void *arg)
{
	uint64_t number = (uintptr_t)arg, *heap = malloc(64 * sizeof(*heap)), state = number * 2 + 1;
	uint64_t value = 0;

	if (!heap)
		return NULL;
	for (int i = 0; i < 64; i++)
		heap[i] = wl_rand(&state);
	for (int i = 0; i < 64; i++)
		value ^= heap[i];
	free(heap);
	return (void *)(uintptr_t)value;
}

static void run_worker(int spawner)
{
	uint64_t number = (uint64_t)workers[spawner] * SPAWNERS + spawner;
	pthread_t thread;
	void *got;

	errno = pthread_create(&thread, NULL, worker, (void *)(uintptr_t)number);
	if (errno)
		wl_die("pthread_create");
	errno = pthread_join(thread, &got);
	if (errno)
		wl_die("pthread_join");
	WL_CHECK((uintptr_t)got == expected(number), "worker %lu returned %#lx", (unsigned long)number,
		 (unsigned long)(uintptr_t)got);
	workers[spawner]++;
}

static void *spawner(void *arg)
{
	int me = (int)(intptr_t)arg;
	struct stat st;

	while (stat(stop_file, &st) != 0 && !wl_failure[0])
		run_worker(me);
	for (int i = 0; i < AFTER_STOP; i++)
		run_worker(me);
	return NULL;
}

int main(int argc, char **argv)
{
	pthread_t spawners[SPAWNERS];

	if (argc != 2) {
		fprintf(stderr, "usage: thread_churn FILE\n");
		return 2;
	}
	stop_file = argv[1];
	wl_ready();
	for (int i = 0; i < SPAWNERS; i++) {
		errno = pthread_create(&spawners[i], NULL, spawner, (void *)(intptr_t)i);
		if (errno)
			wl_die("pthread_create");
	}
	for (int i = 0; i < SPAWNERS; i++)
		pthread_join(spawners[i], NULL);
	printf("workers %ld %ld\n", workers[0], workers[1]);
	return wl_finish();
}
