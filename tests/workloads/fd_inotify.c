/*
 * inotify: the watches come back on the same files, with their masks and watch descriptors,
 * and each instance with its flags.
 *
 * usage: fd_inotify DIR
 *
 * In DIR: directory "w" watched for IN_CREATE|IN_DELETE (wd 1); file "a" watched for IN_MODIFY
 * after an earlier watch on it was removed (so its wd is 3, not 2); file "b" watched for
 * IN_ATTRIB|IN_ONESHOT (wd 4), then renamed "b2": the watch follows the file, not its name.  A
 * second, blocking instance watches "a" for IN_CLOSE_WRITE (wd 1).  Both queues are read empty
 * before READY.  After the window each change makes exactly the events expected: on the first
 * instance CREATE "new" (1), MODIFY (3), ATTRIB (4) and the one-shot's IGNORED (4), and nothing
 * for the removed watch or for a second change of "b2"; on the second, CLOSE_WRITE (1).
 */
#include "wl.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/inotify.h>
#include <sys/stat.h>

#define EVENTS_MAX 16

struct seen {
	int wd;
	uint32_t mask;
	char name[32];
};

static char dir[256];

static const char *in(const char *name)
{
	static char paths[4][512];
	static int next;
	char *path = paths[next++ % 4];

	snprintf(path, sizeof(paths[0]), "%s/%s", dir, name);
	return path;
}

static void touch(const char *path)
{
	int fd = open(path, O_CREAT | O_WRONLY, 0600);

	if (fd < 0 || close(fd))
		wl_die(path);
}

/* Every event queued on `fd` now (it is read without blocking). */
static int events(int fd, struct seen *seen)
{
	char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
	struct pollfd p = { .fd = fd, .events = POLLIN };
	int n = 0;
	ssize_t len;

	while (poll(&p, 1, 0) == 1 && (len = read(fd, buf, sizeof(buf))) > 0) {
		for (char *at = buf; at < buf + len && n < EVENTS_MAX; n++) {
			struct inotify_event *e = (struct inotify_event *)at;

			seen[n].wd = e->wd;
			seen[n].mask = e->mask;
			snprintf(seen[n].name, sizeof(seen[n].name), "%s", e->len ? e->name : "");
			at += sizeof(*e) + e->len;
		}
	}
	return n;
}

static void expect(struct seen *seen, int n, int i, int wd, uint32_t mask, const char *name)
{
	WL_CHECK(i < n, "event %d (wd %d, mask %#x) did not come", i, wd, mask);
	if (i < n)
		WL_CHECK(seen[i].wd == wd && seen[i].mask == mask && !strcmp(seen[i].name, name),
			 "event %d is wd %d mask %#x '%s', not wd %d mask %#x '%s'", i, seen[i].wd,
			 seen[i].mask, seen[i].name, wd, mask, name);
}

int main(int argc, char **argv)
{
	struct seen seen[EVENTS_MAX];
	int first, second, wd_w, wd_a, wd_b, wd_closed, n;

	if (argc < 2) {
		fprintf(stderr, "usage: fd_inotify DIR\n");
		return 2;
	}
	snprintf(dir, sizeof(dir), "%s", argv[1]);
	if (mkdir(in("w"), 0700) && errno != EEXIST)
		wl_die("mkdir");
	unlink(in("w/new"));
	touch(in("a"));
	unlink(in("b2"));
	touch(in("b"));
	first = inotify_init1(IN_NONBLOCK);
	second = inotify_init1(0);
	if (first < 0 || second < 0)
		wl_die("inotify_init1");
	wd_w = inotify_add_watch(first, in("w"), IN_CREATE | IN_DELETE);
	if (inotify_rm_watch(first, inotify_add_watch(first, in("a"), IN_ATTRIB)))
		wl_die("inotify_rm_watch");
	wd_a = inotify_add_watch(first, in("a"), IN_MODIFY);
	wd_b = inotify_add_watch(first, in("b"), IN_ATTRIB | IN_ONESHOT);
	wd_closed = inotify_add_watch(second, in("a"), IN_CLOSE_WRITE);
	if (wd_w != 1 || wd_a != 3 || wd_b != 4 || wd_closed != 1)
		wl_die("inotify_add_watch");
	if (rename(in("b"), in("b2")))
		wl_die("rename");
	events(first, seen);
	events(second, seen);
	wl_ready();

	wl_sleep(WL_WINDOW_S);

	WL_CHECK(fcntl(first, F_GETFL) & O_NONBLOCK, "the first instance became blocking");
	WL_CHECK(!(fcntl(second, F_GETFL) & O_NONBLOCK), "the second instance became non-blocking");
	n = events(first, seen);
	WL_CHECK(n == 0, "%d events were queued before any change (first: wd %d mask %#x)", n,
		 seen[0].wd, seen[0].mask);
	touch(in("w/new"));
	touch(in("w/new"));  /* exists now: no second CREATE */
	{
		int fd = open(in("a"), O_WRONLY | O_APPEND);

		if (fd < 0 || write(fd, "x", 1) != 1 || close(fd))
			wl_die("a");
	}
	if (chmod(in("b2"), 0640) || chmod(in("b2"), 0600))
		wl_die("chmod");
	n = events(first, seen);
	expect(seen, n, 0, wd_w, IN_CREATE, "new");
	expect(seen, n, 1, wd_a, IN_MODIFY, "");
	expect(seen, n, 2, wd_b, IN_ATTRIB, "");
	expect(seen, n, 3, wd_b, IN_IGNORED, "");
	WL_CHECK(n == 4, "%d events on the first instance, not 4", n);
	n = events(second, seen);
	expect(seen, n, 0, wd_closed, IN_CLOSE_WRITE, "");
	WL_CHECK(n == 1, "%d events on the second instance, not 1", n);
	unlink(in("w/new"));  /* the next run (a restore of this one) creates it again */
	return wl_finish();
}
