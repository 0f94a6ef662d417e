/*
 * An MPI job: each step every rank sends a large message to its right neighbour and receives
 * one from its left with non-blocking calls (MPI_Isend/MPI_Irecv), folds a checksum of what it
 * received into its state, and all ranks sum their states (MPI_Allreduce).  Rank 0 prints
 * "STEP <i> <sum>" every step and "DONE <state>" at the end: a run that was checkpointed and
 * restored must print exactly what an uninterrupted run prints.
 *
 * With HOLD_MS, each step lets the messages get under way (MPI progress for up to 20 ms), then
 * sleeps HOLD_MS without progress: the connections' queues stay full of the messages
 * meanwhile, so that a checkpoint taken at any moment most likely catches them in flight.
 *
 * usage: ring STEPS [BYTES [HOLD_MS]]
 */
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static uint64_t mix(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdULL;
	x ^= x >> 33;
	return x;
}

static double now_ms(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

/* MPI progress on `req` for up to `ms` milliseconds, or until both are complete. */
static void get_under_way(MPI_Request req[2], double ms)
{
	double until = now_ms() + ms;
	int done = 0;
	MPI_Status statuses[2];

	while (!done && now_ms() < until)
		MPI_Testall(2, req, &done, statuses);
}

int main(int argc, char **argv)
{
	int rank, size, steps = argc > 1 ? atoi(argv[1]) : 200;
	size_t words = (argc > 2 ? strtoul(argv[2], NULL, 0) : 4 << 20) / 8;
	uint64_t *out = malloc(words * 8), *in = malloc(words * 8), state, total = 0;
	long hold_ms = argc > 3 ? atol(argv[3]) : 0;
	struct timespec pause = { hold_ms / 1000, (hold_ms ? hold_ms % 1000 : 10) * 1000 * 1000 };

	MPI_Init(&argc, &argv);
	MPI_Comm_rank(MPI_COMM_WORLD, &rank);
	MPI_Comm_size(MPI_COMM_WORLD, &size);
	if (!out || !in)
		MPI_Abort(MPI_COMM_WORLD, 1);
	state = mix(rank + 1);
	for (int step = 0; step < steps; step++) {
		MPI_Request req[2];
		MPI_Status statuses[2];
		uint64_t sum = 0;

		for (size_t i = 0; i < words; i++)
			out[i] = mix(state + i);
		MPI_Irecv(in, words, MPI_UINT64_T, (rank + size - 1) % size, step, MPI_COMM_WORLD,
			  &req[0]);
		MPI_Isend(out, words, MPI_UINT64_T, (rank + 1) % size, step, MPI_COMM_WORLD,
			  &req[1]);
		if (hold_ms)
			get_under_way(req, 20);
		nanosleep(&pause, NULL); /* the messages are in flight meanwhile */
		MPI_Waitall(2, req, statuses);
		for (size_t i = 0; i < words; i += 512)
			sum = mix(sum ^ in[i]);
		state = mix(state ^ sum);
		MPI_Allreduce(&state, &total, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);
		if (rank == 0) {
			printf("STEP %d %llu\n", step, (unsigned long long)total);
			fflush(stdout);
		}
	}
	if (rank == 0)
		printf("DONE %llu\n", (unsigned long long)total);
	MPI_Finalize();
	return 0;
}
