/*
 * Credentials: an unprivileged process (started as uid/gid 1000 with no supplementary groups)
 * keeps exactly its ids, its empty capability sets, its process group and its session.
 * Instead of a fixed window it waits for SIGUSR1 (up to 60 s), so that the test can look at the
 * restored process from outside before letting it finish.
 */
#include "wl.h"

#include <signal.h>

#define NCAPS 5

static const char *const cap_names[NCAPS] = {"CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"};

struct ids {
	uid_t uid[3];
	gid_t gid[3];
	int ngroups;
	pid_t pgid, sid;
	unsigned long long caps[NCAPS];
};

static void read_ids(struct ids *ids)
{
	char line[256];
	FILE *f;

	getresuid(&ids->uid[0], &ids->uid[1], &ids->uid[2]);
	getresgid(&ids->gid[0], &ids->gid[1], &ids->gid[2]);
	ids->ngroups = getgroups(0, NULL);
	ids->pgid = getpgid(0);
	ids->sid = getsid(0);
	f = fopen("/proc/self/status", "r");
	if (!f)
		wl_die("/proc/self/status");
	while (fgets(line, sizeof(line), f))
		for (int i = 0; i < NCAPS; i++)
			if (!strncmp(line, cap_names[i], 6) && line[6] == ':')
				ids->caps[i] = strtoull(line + 7, NULL, 16);
	fclose(f);
}

int main(void)
{
	struct ids before, after;
	struct timespec timeout = {1, 0};
	double deadline;
	sigset_t set;
	int sig = 0;

	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	sigprocmask(SIG_BLOCK, &set, NULL);
	read_ids(&before);
	for (int i = 0; i < 3; i++)
		if (before.uid[i] != 1000 || before.gid[i] != 1000)
			wl_die("not started as uid/gid 1000");
	if (before.caps[2] || before.caps[1] || before.ngroups)
		wl_die("started with capabilities or supplementary groups");
	wl_ready();

	/* sigtimedwait may return EINTR when the process is stopped and resumed: wait again. */
	deadline = wl_now() + 60;
	while (sig != SIGUSR1 && wl_now() < deadline)
		sig = sigtimedwait(&set, NULL, &timeout);
	WL_CHECK(sig == SIGUSR1, "no SIGUSR1 within 60 s");

	read_ids(&after);
	for (int i = 0; i < 3; i++) {
		WL_CHECK(after.uid[i] == before.uid[i], "uid[%d] %d became %d", i, before.uid[i],
			 after.uid[i]);
		WL_CHECK(after.gid[i] == before.gid[i], "gid[%d] %d became %d", i, before.gid[i],
			 after.gid[i]);
	}
	WL_CHECK(after.ngroups == 0, "%d supplementary groups appeared", after.ngroups);
	for (int i = 0; i < NCAPS; i++)
		WL_CHECK(after.caps[i] == before.caps[i], "%s %llx became %llx", cap_names[i],
			 before.caps[i], after.caps[i]);
	WL_CHECK(after.pgid == before.pgid && after.sid == before.sid,
		 "pgid/sid %d/%d became %d/%d", before.pgid, before.sid, after.pgid, after.sid);
	return wl_finish();
}
