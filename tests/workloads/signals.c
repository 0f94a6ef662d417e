/*
 * Signals: dispositions, masks, the alternate stack and pending signals survive.
 *
 * Set up before READY:
 * - handlers (one SA_SIGINFO function) for SIGUSR1 (SA_RESTART|SA_ONSTACK, sa_mask HUP+TERM),
 *   SIGUSR2 (no flags but SA_SIGINFO, sa_mask INT) and SIGRTMIN+1 (SA_RESTART|SA_ONSTACK,
 *   sa_mask QUIT); SIGPIPE ignored;
 * - blocked in every thread: USR1, USR2, RTMIN+1 and XCPU; an alternate stack in the leader;
 * - pending: SIGUSR1 raised in the leader, SIGRTMIN+1 queued twice to the process with values
 *   1111 and 2222, SIGUSR2 sent with pthread_kill to the second thread.
 * After the window both threads query all of this back, then unblock and check what the handler
 * saw: each signal delivered once (RTMIN+1 twice, values in order) to the right thread, with the
 * right si_code, si_pid and si_value, on the alternate stack where asked, with sa_mask blocked.
 */
#include "wl.h"

#include <signal.h>

#define MAXREC 8
#define ALTSTACK_SIZE (64 * 1024)

struct record {
	int signo, code, value;
	pid_t pid, tid;
	int on_altstack, mask_blocked;
};

static struct record records[MAXREC];
static int nrecords;
static char altstack[ALTSTACK_SIZE];
static int sig_rt;
static pid_t leader_tid, other_tid;
static pthread_barrier_t sync_point;

struct disposition {
	int signo, flags, mask_signo;
};

static struct disposition dispositions[3];
static struct sigaction installed[3], ignored;

static void handler(int signo, siginfo_t *si, void *uc)
{
	int idx = __atomic_fetch_add(&nrecords, 1, __ATOMIC_SEQ_CST);
	struct record *r = &records[idx];
	char here;
	sigset_t now;

	if (idx >= MAXREC)
		return;
	pthread_sigmask(SIG_BLOCK, NULL, &now);
	r->signo = signo;
	r->code = si->si_code;
	r->value = si->si_value.sival_int;
	r->pid = si->si_pid;
	r->tid = wl_gettid();
	r->on_altstack = &here >= altstack && &here < altstack + ALTSTACK_SIZE;
	for (int i = 0; i < 3; i++)
		if (dispositions[i].signo == signo)
			r->mask_blocked = sigismember(&now, dispositions[i].mask_signo) == 1;
}

static void blocked_set(sigset_t *set)
{
	sigemptyset(set);
	sigaddset(set, SIGUSR1);
	sigaddset(set, SIGUSR2);
	sigaddset(set, sig_rt);
	sigaddset(set, SIGXCPU);
}

/* sigset_t compared signal by signal: glibc only fills the kernel's part of it. */
static int same_set(const sigset_t *a, const sigset_t *b)
{
	for (int s = 1; s < 65; s++)
		if (sigismember(a, s) != sigismember(b, s))
			return 0;
	return 1;
}

static void install(void)
{
	struct sigaction sa;

	dispositions[0] = (struct disposition){SIGUSR1, SA_RESTART | SA_ONSTACK, SIGTERM};
	dispositions[1] = (struct disposition){SIGUSR2, 0, SIGINT};
	dispositions[2] = (struct disposition){sig_rt, SA_RESTART | SA_ONSTACK, SIGQUIT};
	for (int i = 0; i < 3; i++) {
		memset(&sa, 0, sizeof(sa));
		sa.sa_sigaction = handler;
		sa.sa_flags = SA_SIGINFO | dispositions[i].flags;
		sigemptyset(&sa.sa_mask);
		sigaddset(&sa.sa_mask, dispositions[i].mask_signo);
		if (i == 0)
			sigaddset(&sa.sa_mask, SIGHUP);
		if (sigaction(dispositions[i].signo, &sa, NULL))
			wl_die("sigaction");
		sigaction(dispositions[i].signo, NULL, &installed[i]);
	}
	signal(SIGPIPE, SIG_IGN);
	sigaction(SIGPIPE, NULL, &ignored);
}

static void check_dispositions(void)
{
	struct sigaction now;

	for (int i = 0; i < 3; i++) {
		sigaction(dispositions[i].signo, NULL, &now);
		WL_CHECK(now.sa_sigaction == installed[i].sa_sigaction,
			 "signal %d: handler %p became %p", dispositions[i].signo,
			 (void *)installed[i].sa_sigaction, (void *)now.sa_sigaction);
		WL_CHECK(now.sa_flags == installed[i].sa_flags, "signal %d: flags %#x became %#x",
			 dispositions[i].signo, installed[i].sa_flags, now.sa_flags);
		WL_CHECK(same_set(&now.sa_mask, &installed[i].sa_mask), "signal %d: sa_mask differs",
			 dispositions[i].signo);
	}
	sigaction(SIGPIPE, NULL, &now);
	WL_CHECK(now.sa_handler == SIG_IGN && ignored.sa_handler == SIG_IGN,
		 "SIGPIPE is no longer ignored");
}

/* This thread's mask is the blocked set and its pending set holds exactly `expected`. */
static void check_thread_state(const char *who, const sigset_t *expected)
{
	sigset_t mask, pending, blocked;

	blocked_set(&blocked);
	pthread_sigmask(SIG_BLOCK, NULL, &mask);
	WL_CHECK(same_set(&mask, &blocked), "%s: signal mask differs", who);
	sigpending(&pending);
	WL_CHECK(same_set(&pending, expected), "%s: pending set differs", who);
}

static void *other(void *arg)
{
	sigset_t expected, set;
	stack_t ss;

	other_tid = wl_gettid();
	pthread_barrier_wait(&sync_point);	/* the leader sends us SIGUSR2 */
	pthread_barrier_wait(&sync_point);
	wl_sleep(WL_WINDOW_S);

	sigemptyset(&expected);
	sigaddset(&expected, SIGUSR2);
	sigaddset(&expected, sig_rt);
	check_thread_state("second thread", &expected);
	sigaltstack(NULL, &ss);
	WL_CHECK(ss.ss_flags == SS_DISABLE, "second thread: has an alternate stack");
	sigemptyset(&set);
	sigaddset(&set, SIGUSR2);
	pthread_sigmask(SIG_UNBLOCK, &set, NULL);
	return NULL;
}

static void check_record(const struct record *r, int signo, int code, int value, pid_t tid,
			 int on_altstack)
{
	WL_CHECK(r->signo == signo, "expected signal %d, got %d", signo, r->signo);
	WL_CHECK(r->code == code, "signal %d: si_code %d, not %d", signo, r->code, code);
	WL_CHECK(r->pid == wl_pid, "signal %d: si_pid %d, not %d", signo, r->pid, wl_pid);
	WL_CHECK(code != SI_QUEUE || r->value == value, "signal %d: si_value %d, not %d", signo,
		 r->value, value);
	WL_CHECK(r->tid == tid, "signal %d: handled by %d, not %d", signo, r->tid, tid);
	WL_CHECK(r->on_altstack == on_altstack, "signal %d: %s the alternate stack", signo,
		 on_altstack ? "not on" : "on");
	WL_CHECK(r->mask_blocked, "signal %d: its sa_mask was not blocked in the handler", signo);
}

static void check_deliveries(void)
{
	int usr1 = -1, rt[2] = {-1, -1}, usr2 = -1, nrt = 0;

	WL_CHECK(nrecords == 4, "%d signals delivered, not 4", nrecords);
	for (int i = 0; i < nrecords && i < MAXREC; i++) {
		if (records[i].signo == SIGUSR1)
			usr1 = i;
		else if (records[i].signo == SIGUSR2)
			usr2 = i;
		else if (records[i].signo == sig_rt && nrt < 2)
			rt[nrt++] = i;
	}
	if (usr1 < 0 || usr2 < 0 || nrt != 2) {
		wl_fail("delivered: SIGUSR1 %s, SIGUSR2 %s, SIGRTMIN+1 %d times",
			usr1 < 0 ? "no" : "yes", usr2 < 0 ? "no" : "yes", nrt);
		return;
	}
	check_record(&records[usr1], SIGUSR1, SI_TKILL, 0, leader_tid, 1);
	check_record(&records[usr2], SIGUSR2, SI_TKILL, 0, other_tid, 0);
	check_record(&records[rt[0]], sig_rt, SI_QUEUE, 1111, leader_tid, 1);
	check_record(&records[rt[1]], sig_rt, SI_QUEUE, 2222, leader_tid, 1);
}

int main(void)
{
	sigset_t blocked, expected;
	stack_t ss = {.ss_sp = altstack, .ss_size = ALTSTACK_SIZE}, now;
	pthread_t thread;

	sig_rt = SIGRTMIN + 1;
	leader_tid = wl_gettid();
	install();
	blocked_set(&blocked);
	pthread_sigmask(SIG_BLOCK, &blocked, NULL);
	if (sigaltstack(&ss, NULL))
		wl_die("sigaltstack");
	pthread_barrier_init(&sync_point, NULL, 2);
	if (pthread_create(&thread, NULL, other, NULL))
		wl_die("pthread_create");
	pthread_barrier_wait(&sync_point);
	raise(SIGUSR1);
	if (sigqueue(getpid(), sig_rt, (union sigval){.sival_int = 1111}) ||
	    sigqueue(getpid(), sig_rt, (union sigval){.sival_int = 2222}))
		wl_die("sigqueue");
	pthread_kill(thread, SIGUSR2);
	pthread_barrier_wait(&sync_point);
	wl_ready();

	wl_sleep(WL_WINDOW_S);

	/* The second thread takes its SIGUSR2 first; RTMIN+1 stays blocked there. */
	pthread_join(thread, NULL);
	check_dispositions();
	sigemptyset(&expected);
	sigaddset(&expected, SIGUSR1);
	sigaddset(&expected, sig_rt);
	check_thread_state("leader", &expected);
	sigaltstack(NULL, &now);
	WL_CHECK(now.ss_sp == ss.ss_sp && now.ss_size == ss.ss_size && now.ss_flags == 0,
		 "alternate stack %p+%zu flags %d became %p+%zu flags %d", ss.ss_sp, ss.ss_size,
		 ss.ss_flags, now.ss_sp, now.ss_size, now.ss_flags);
	pthread_sigmask(SIG_UNBLOCK, &blocked, NULL);
	check_deliveries();
	return wl_finish();
}
