/*
 * SysV IPC objects shared by a root and two children: a counter under a SysV semaphore, in a
 * SysV shared memory segment or in POSIX shared memory, and a SysV message queue.
 *
 * usage: sysv_counter sysv|posix
 *
 * The root creates (keys made from its pid) a semaphore set of two: a lock at 1 and a constant
 * at SEM_CONST; a message queue with MESSAGES queued (types 3, 1, 2); the counter's memory: a
 * SysV segment (`sysv`) or a /dev/shm object (`posix`, shm_open); in `sysv` mode also a second
 * segment removed (IPC_RMID) while attached.  All three processes add ROUNDS to the counter, one
 * increment at a time under the lock (semop, no SEM_UNDO), then wait through the window.  After
 * it, the root checks that each key still names the same id, the semaphores' values, the messages
 * (read in order, with their types and texts) and the counter at 3 * ROUNDS; then everyone adds
 * ROUNDS more (the children also mark their slot in the removed segment) and the root checks the
 * counter at 6 * ROUNDS and the marks.  The objects are removed at the end.
 */
#include "tree.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/shm.h>

#define ROUNDS 20000
#define PROCS 3
#define SEM_CONST 7
#define MESSAGES 3
#define REMOVED_SIZE (3 * 4096)
#define MARKS (REMOVED_SIZE / 8) /* the children's marks, after the filled part */

struct counter {
	volatile long value;
	volatile long mine[PROCS];
};

struct message {
	long type;
	char text[32];
};

static const long types[MESSAGES] = { 3, 1, 2 };
static int semid, msqid;
static struct counter *counter;
static volatile long *removed; /* the segment removed while attached */

static void sem_change(int num, int delta)
{
	struct sembuf op = { .sem_num = num, .sem_op = delta, .sem_flg = 0 };

	while (semop(semid, &op, 1) < 0)
		if (errno != EINTR)
			wl_die("semop");
}

static void add(int who)
{
	for (long i = 0; i < ROUNDS; i++) {
		sem_change(0, -1);
		long seen = counter->value;

		counter->mine[who]++;
		counter->value = seen + 1;
		sem_change(0, 1);
	}
}

__attribute__((noreturn))
static void child(int who)
{
	add(who);
	tree_ready();
	wl_sleep(WL_WINDOW_S + 1);
	tree_check_place();
	add(who);
	if (removed)
		removed[MARKS + who] = 1000 + who;
	tree_exit();
}

static void *attach_new(key_t key, size_t size, int *id)
{
	void *p;

	*id = shmget(key, size, IPC_CREAT | IPC_EXCL | 0640);
	if (*id < 0)
		wl_die("shmget");
	p = shmat(*id, NULL, 0);
	if (p == (void *)-1)
		wl_die("shmat");
	return p;
}

static void check_messages(void)
{
	struct message m;

	for (int i = 0; i < MESSAGES; i++) {
		ssize_t n = msgrcv(msqid, &m, sizeof(m.text), 0, IPC_NOWAIT);
		char want[32];

		if (n < 0) {
			wl_fail("message %d: msgrcv: %s", i, strerror(errno));
			return;
		}
		snprintf(want, sizeof(want), "message %d", i);
		WL_CHECK(m.type == types[i] && n == (ssize_t)strlen(want) + 1 && !strcmp(m.text, want),
			 "message %d is type %ld '%.*s', not type %ld '%s'", i, m.type, (int)n, m.text,
			 types[i], want);
	}
	WL_CHECK(msgrcv(msqid, &m, sizeof(m.text), 0, IPC_NOWAIT) < 0 && errno == ENOMSG,
		 "more messages than were sent");
}

int main(int argc, char **argv)
{
	static const char *names[PROCS] = { "root", "c1", "c2" };
	key_t key = 0x48500000 | (getpid() & 0xffff);
	int sysv = argc > 1 && !strcmp(argv[1], "sysv");
	char posix_name[64] = "";
	int shmid = -1, removed_id = -1;
	pid_t pids[PROCS];

	semid = semget(key, 2, IPC_CREAT | IPC_EXCL | 0600);
	msqid = msgget(key, IPC_CREAT | IPC_EXCL | 0620);
	if (semid < 0 || msqid < 0)
		wl_die("semget/msgget");
	if (semctl(semid, 0, SETVAL, 1) || semctl(semid, 1, SETVAL, SEM_CONST))
		wl_die("semctl");
	for (int i = 0; i < MESSAGES; i++) {
		struct message m = { .type = types[i] };

		snprintf(m.text, sizeof(m.text), "message %d", i);
		if (msgsnd(msqid, &m, strlen(m.text) + 1, 0))
			wl_die("msgsnd");
	}
	if (sysv) {
		counter = attach_new(key, sizeof(*counter), &shmid);
		removed = attach_new(IPC_PRIVATE, REMOVED_SIZE + 100, &removed_id);
		wl_fill((void *)removed, REMOVED_SIZE, 42);
	} else {
		int fd;

		snprintf(posix_name, sizeof(posix_name), "/hpccr-sysv-%ld-%d", (long)time(NULL), key);
		fd = shm_open(posix_name, O_RDWR | O_CREAT | O_EXCL, 0600);
		if (fd < 0 || ftruncate(fd, sizeof(*counter)))
			wl_die("shm_open");
		counter = mmap(NULL, sizeof(*counter), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		if (counter == MAP_FAILED)
			wl_die("mmap");
		close(fd);
	}
	tree_start();
	for (int who = 1; who < PROCS; who++) {
		pids[who] = tree_fork(names[who]);
		if (pids[who] == 0)
			child(who);
	}
	if (sysv && shmctl(removed_id, IPC_RMID, NULL)) /* it lives on while attached */
		wl_die("shmctl IPC_RMID");
	add(0);
	tree_wait_ready(PROCS - 1);
	printf("IDS %d %d %d\n", shmid, semid, msqid);
	fflush(stdout);
	wl_sleep(WL_WINDOW_S);

	tree_check_place();
	WL_CHECK(semget(key, 0, 0) == semid, "key %#x names semaphore set %d, not %d", key,
		 semget(key, 0, 0), semid);
	WL_CHECK(msgget(key, 0) == msqid, "key %#x names queue %d, not %d", key, msgget(key, 0),
		 msqid);
	if (sysv)
		WL_CHECK(shmget(key, 0, 0) == shmid, "key %#x names segment %d, not %d", key,
			 shmget(key, 0, 0), shmid);
	WL_CHECK(semctl(semid, 1, GETVAL) == SEM_CONST, "semaphore 1 is %d, not %d",
		 semctl(semid, 1, GETVAL), SEM_CONST);
	WL_CHECK(counter->value == PROCS * ROUNDS, "counter %ld after the window, not %d",
		 counter->value, PROCS * ROUNDS);
	if (removed)
		WL_CHECK(wl_verify((const void *)removed, REMOVED_SIZE, 42) < 0,
			 "the removed segment's content changed at %ld",
			 wl_verify((const void *)removed, REMOVED_SIZE, 42));
	check_messages();
	add(0);
	for (int who = 1; who < PROCS; who++)
		tree_reap(pids[who], names[who]);
	WL_CHECK(semctl(semid, 0, GETVAL) == 1, "the lock is %d, not 1", semctl(semid, 0, GETVAL));
	WL_CHECK(counter->value == 2 * PROCS * ROUNDS, "counter %ld at the end, not %d",
		 counter->value, 2 * PROCS * ROUNDS);
	for (int who = 0; who < PROCS; who++)
		WL_CHECK(counter->mine[who] == 2 * ROUNDS, "%s made %ld increments, not %d",
			 names[who], counter->mine[who], 2 * ROUNDS);
	for (int who = 1; removed && who < PROCS; who++)
		WL_CHECK(removed[MARKS + who] == 1000 + who,
			 "%s's mark in the removed segment is %ld", names[who], removed[MARKS + who]);
	semctl(semid, 0, IPC_RMID);
	msgctl(msqid, IPC_RMID, NULL);
	if (sysv)
		shmctl(shmid, IPC_RMID, NULL);
	else
		shm_unlink(posix_name);
	return wl_finish();
}
