/*
 * A thread group whose main thread has exited (pthread_exit in main) while its workers run:
 * the leader is a zombie thread, the process lives on in the others.
 *
 * usage: thread_leader_exit [SECONDS]
 *
 * Three workers, each with its name, its tid and data on its own stack; they share 32 MiB of
 * PRNG data on the heap (enough for a running dump's snapshot) and a pipe holding data.  Once
 * main has exited (its /proc state is Z), worker 0 prints READY.  After the window each worker
 * checks its tid, name and stack data; worker 0 checks the heap and the pipe's data, that the
 * leader is still a zombie, with the process's name, and that the process still has four tasks
 * (the leader counts until the group has exited), then exits the process with the result.
 */
#include "wl.h"

#include <sys/prctl.h>

#define WORKERS 3
#define HEAP (32UL << 20)
#define STACK_DATA 4096

static char *heap;
static char comm[32]; /* the process's name: its main thread's */
static int pipefd[2];
static pthread_barrier_t checked;
static double window;

static char leader_state(void)
{
	char buf[512], *p;
	FILE *f = fopen("/proc/self/stat", "r");

	if (!f || !fgets(buf, sizeof(buf), f))
		wl_die("/proc/self/stat");
	fclose(f);
	p = strrchr(buf, ')');
	return p ? p[2] : '?';
}

static void read_comm(char *buf, size_t size)
{
	FILE *f = fopen("/proc/self/comm", "r");

	if (!f || !fgets(buf, size, f))
		wl_die("/proc/self/comm");
	fclose(f);
}

static int status_field(const char *key)
{
	char line[256];
	int value = -1;
	size_t n = strlen(key);
	FILE *f = fopen("/proc/self/status", "r");

	if (!f)
		wl_die("/proc/self/status");
	while (fgets(line, sizeof(line), f))
		if (!strncmp(line, key, n) && line[n] == ':')
			value = atoi(line + n + 1);
	fclose(f);
	return value;
}

static void *worker(void *arg)
{
	long i = (long)arg;
	uint64_t data[STACK_DATA / 8];
	char name[16], want[16];
	pid_t tid = wl_gettid();

	snprintf(want, sizeof(want), "worker-%ld", i);
	prctl(PR_SET_NAME, want);
	wl_fill(data, sizeof(data), 1000 + i);
	if (i == 0) {
		while (leader_state() != 'Z')
			usleep(1000);
		wl_ready();
	}
	wl_sleep(window + 0.5);
	WL_CHECK(wl_gettid() == tid, "worker %ld: tid %d became %d", i, tid, wl_gettid());
	prctl(PR_GET_NAME, name);
	WL_CHECK(!strcmp(name, want), "worker %ld: name '%s', not '%s'", i, name, want);
	WL_CHECK(wl_verify(data, sizeof(data), 1000 + i) < 0, "worker %ld: stack data differs", i);
	if (i == 0) { /* while the others wait at the barrier, alive */
		char queued[64] = "", now[32];

		WL_CHECK(wl_verify(heap, HEAP, 42) < 0, "the heap block differs");
		WL_CHECK(read(pipefd[0], queued, sizeof(queued)) == 7 && !strcmp(queued, "queued"),
			 "the pipe's data is not 'queued'");
		WL_CHECK(leader_state() == 'Z', "the leader is in state %c, not a zombie",
			 leader_state());
		read_comm(now, sizeof(now));
		WL_CHECK(!strcmp(now, comm), "the process is named %s, not %s", now, comm);
		/* the zombie leader counts until the whole group has exited */
		WL_CHECK(status_field("Threads") == WORKERS + 1, "%d threads, not %d",
			 status_field("Threads"), WORKERS + 1);
	}
	pthread_barrier_wait(&checked);
	if (i)
		return NULL;
	exit(wl_finish());
}

int main(int argc, char **argv)
{
	pthread_t threads[WORKERS];

	window = argc > 1 ? atof(argv[1]) : WL_WINDOW_S;
	read_comm(comm, sizeof(comm));
	heap = malloc(HEAP);
	if (!heap)
		wl_die("malloc");
	wl_fill(heap, HEAP, 42);
	if (pipe(pipefd) || write(pipefd[1], "queued", 7) != 7)
		wl_die("pipe");
	pthread_barrier_init(&checked, NULL, WORKERS);
	for (long i = 0; i < WORKERS; i++)
		if (pthread_create(&threads[i], NULL, worker, (void *)i))
			wl_die("pthread_create");
	pthread_exit(NULL);
}
