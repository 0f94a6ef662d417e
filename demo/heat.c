/* Demo workload: explicit 2-D heat diffusion on a 1024x1024 grid, two threads, ~150 MiB.
 * Prints one line per step with a checksum of the grid; the final checksum does not depend on
 * whether the run was checkpointed and restored in between, which is what the demo checks. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define N 1024
#define STEPS 40

static double *grid, *next;
static pthread_barrier_t barrier;
static double scratch[8][N * N / 8]; /* more memory in the image, touched by the workers */

static void relax_rows(int lo, int hi)
{
    for (int i = lo; i < hi; i++) {
        if (i == 0 || i == N - 1)
            continue;
        for (int j = 1; j < N - 1; j++)
            next[i * N + j] = grid[i * N + j] + 0.2 * (grid[(i - 1) * N + j] +
                grid[(i + 1) * N + j] + grid[i * N + j - 1] + grid[i * N + j + 1] -
                4 * grid[i * N + j]);
    }
}

static void *worker(void *arg)
{
    long half = (long)arg;
    for (int step = 0; step < STEPS; step++) {
        for (int r = 0; r < 20; r++) {
            relax_rows(half * N / 2, (half + 1) * N / 2);
            pthread_barrier_wait(&barrier);
            if (half == 0) {
                double *t = grid; grid = next; next = t;
            }
            pthread_barrier_wait(&barrier);
        }
        memcpy(scratch[step % 8], grid + half * N * N / 2, sizeof(scratch[0]));
        pthread_barrier_wait(&barrier);
        if (half == 0) {
            uint64_t sum = 0;
            for (long k = 0; k < N * N; k++) {
                uint64_t bits;
                memcpy(&bits, &grid[k], sizeof bits);
                sum = sum * 1099511628211ULL ^ bits;
            }
            printf("pid %d step %2d/%d checksum %016llx\n", getpid(), step + 1, STEPS,
                   (unsigned long long)sum);
            fflush(stdout);
            nanosleep(&(struct timespec){0, 150 * 1000 * 1000}, NULL);
        }
        pthread_barrier_wait(&barrier);
    }
    return NULL;
}

int main(void)
{
    grid = calloc(N * N, sizeof(double));
    next = calloc(N * N, sizeof(double));
    for (int i = 0; i < N; i++)
        grid[i] = next[i] = 100.0; /* a hot top edge */
    pthread_barrier_init(&barrier, NULL, 2);
    pthread_t t;
    pthread_create(&t, NULL, worker, (void *)1L);
    worker((void *)0L);
    pthread_join(t, NULL);
    printf("done\n");
    return 0;
}
