/*
 * Per-thread scheduling: CPU affinity, nice value and policy, as HPC runtimes bind ranks and
 * OpenMP threads to cores.
 *
 * usage: sched
 *
 * The main thread binds itself to the last CPU it may use, with nice 3; a second thread binds
 * itself to the first such CPU, with nice 7 and SCHED_BATCH; a third, SCHED_IDLE, keeps every
 * CPU.  After the window each thread finds its own mask, nice value and policy again.
 */
#include "wl.h"

#include <sched.h>
#include <sys/resource.h>

struct setting {
	int cpu; /* -1: all CPUs allowed at the start */
	int nice;
	int policy;
	pthread_barrier_t *ready;
	cpu_set_t all;
};

static void set_self(struct setting *s)
{
	struct sched_param param = { 0 };
	cpu_set_t mask;

	if (s->cpu >= 0) {
		CPU_ZERO(&mask);
		CPU_SET(s->cpu, &mask);
		if (sched_setaffinity(0, sizeof(mask), &mask))
			wl_die("sched_setaffinity");
	}
	if (setpriority(PRIO_PROCESS, syscall(SYS_gettid), s->nice))
		wl_die("setpriority");
	if (sched_setscheduler(0, s->policy, &param))
		wl_die("sched_setscheduler");
}

static void check_self(struct setting *s, const char *who)
{
	cpu_set_t mask, want;
	int nice;

	if (s->cpu >= 0) {
		CPU_ZERO(&want);
		CPU_SET(s->cpu, &want);
	} else {
		want = s->all;
	}
	WL_CHECK(!sched_getaffinity(0, sizeof(mask), &mask) && CPU_EQUAL(&mask, &want),
		 "%s: CPU affinity lost (%d CPUs allowed)", who, CPU_COUNT(&mask));
	errno = 0;
	nice = getpriority(PRIO_PROCESS, syscall(SYS_gettid));
	WL_CHECK(!errno && nice == s->nice, "%s: nice %d, not %d", who, nice, s->nice);
	WL_CHECK(sched_getscheduler(0) == s->policy, "%s: policy %d, not %d", who,
		 sched_getscheduler(0), s->policy);
}

static void *thread_main(void *arg)
{
	struct setting *s = arg;

	set_self(s);
	pthread_barrier_wait(s->ready);
	pthread_barrier_wait(s->ready);  /* the window is over */
	check_self(s, s->policy == SCHED_BATCH ? "batch thread" : "idle thread");
	return NULL;
}

int main(void)
{
	struct setting main_s = { .nice = 3, .policy = SCHED_OTHER };
	struct setting batch = { .nice = 7, .policy = SCHED_BATCH };
	struct setting idle = { .cpu = -1, .nice = 0, .policy = SCHED_IDLE };
	pthread_barrier_t ready;
	pthread_t t1, t2;
	cpu_set_t all;
	int first = -1, last = -1;

	if (sched_getaffinity(0, sizeof(all), &all))
		wl_die("sched_getaffinity");
	for (int cpu = 0; cpu < CPU_SETSIZE; cpu++)
		if (CPU_ISSET(cpu, &all)) {
			first = first < 0 ? cpu : first;
			last = cpu;
		}
	main_s.cpu = last;
	batch.cpu = first;
	idle.all = all;
	pthread_barrier_init(&ready, NULL, 3);
	batch.ready = idle.ready = &ready;
	if (pthread_create(&t1, NULL, thread_main, &batch) ||
	    pthread_create(&t2, NULL, thread_main, &idle))
		wl_die("pthread_create");
	set_self(&main_s);
	pthread_barrier_wait(&ready);
	wl_ready();
	wl_sleep(WL_WINDOW_S);
	pthread_barrier_wait(&ready);
	check_self(&main_s, "main thread");
	pthread_join(t1, NULL);
	pthread_join(t2, NULL);
	return wl_finish();
}
