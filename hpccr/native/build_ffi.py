"""cffi build script for hpccr._native: the only place in hpccr with C declarations.

The C side stays thin: raw system calls that glibc does not wrap, the ptrace injection loop (hot:
hundreds of calls per restore), bulk memory copies over iovec batches and the pagemap scan (both
per-page work, far too slow in Python).  Policy and parsing live in Python.
"""

from cffi import FFI

CDEF = r"""
struct user_regs_struct {
    unsigned long long r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8, rax, rcx, rdx, rsi, rdi,
        orig_rax, rip, cs, eflags, rsp, ss, fs_base, gs_base, ds, es, fs, gs;
};

long ptrace(int request, int pid, void *addr, void *data);
int kill(int pid, int sig);
long hpccr_syscall6(long nr, long a1, long a2, long a3, long a4, long a5, long a6);

int hpccr_getregset(int tid, int type, void *buf, size_t *len);
int hpccr_setregset(int tid, int type, void *buf, size_t len);

/* Run one system call inside stopped thread `tid`: `ip` must point at a `syscall; int3` pair in
 * its address space.  `base` holds the registers to start from (left unchanged).  Returns 0 and
 * stores the kernel's return value in *ret, or -errno of the ptrace/wait failure. */
int hpccr_inject(int tid, unsigned long long ip, const struct user_regs_struct *base, long nr,
                 long a1, long a2, long a3, long a4, long a5, long a6, long *ret);

/* Like hpccr_inject, but `ip` points at a `syscall` followed by code the thread may run on its
 * own: it is resumed with PTRACE_SYSCALL and left in the syscall-exit stop (which needs
 * PTRACE_O_TRACESYSGOOD, so that a tracer's death there sends it no SIGTRAP). */
int hpccr_inject_to_exit(int tid, unsigned long long ip, const struct user_regs_struct *base,
                         long nr, long a1, long a2, long a3, long a4, long a5, long a6,
                         long *ret);

/* Resume a thread stopped at a syscall exit (as hpccr_inject_to_exit leaves it) until the exit
 * of the next system call in its code; stores that call's return value in *ret. */
int hpccr_next_syscall_exit(int tid, long *ret);

/* Wait for a ptrace stop of `tid` (__WALL); returns the raw status or -errno. */
int hpccr_wait(int tid, int options);

/* Copy `n` remote ranges (addrs[i], lens[i]) of process `pid` to/from a local buffer, in
 * batches of IOV_MAX iovecs: back to back from `buf`, or, if `offsets` is not NULL, each at
 * buf + offsets[i].  Returns bytes moved or -errno. */
long hpccr_read_ranges(int pid, const unsigned long long *addrs, const unsigned long long *lens,
                       size_t n, void *buf);
long hpccr_write_ranges(int pid, const unsigned long long *addrs,
                        const unsigned long long *lens, const unsigned long long *offsets,
                        size_t n, const void *buf);

/* Like hpccr_write_ranges, into the memory of userfaultfd `uffd` (registered in missing mode) by
 * UFFDIO_COPY: the kernel allocates each page with its data, with no fault and no zeroing.  A
 * range not registered there (each range lies inside one registered VMA or outside them all)
 * and a page already present are written by process_vm_writev of `pid`. */
long hpccr_place_ranges(int uffd, int pid, const unsigned long long *addrs,
                        const unsigned long long *lens, const unsigned long long *offsets,
                        size_t n, const void *buf);

/* Fill `len` bytes at `dst` of the memory of userfaultfd `uffd` (registered in missing mode):
 * from `src` by UFFDIO_COPY, or with the zero page (UFFDIO_ZEROPAGE) if `src` is NULL; the
 * threads waiting for those pages are woken.  A page already present is left as it is.
 * Returns 0, or -errno (EAGAIN: the mm is changing, an event waits to be read; ENOENT: not
 * registered there; ESRCH: the mm is gone); *done: the bytes filled or left before that. */
long hpccr_uffd_fill(int uffd, unsigned long long dst, const void *src, unsigned long long len,
                     unsigned long long *done);

/* Collapse pagemap entries into runs of pages having a bit of `any` set and no bit of `none`
 * (pte markers are no pages).
 * Writes at most `max` (first page index, page count) pairs; returns the number of runs. */
size_t hpccr_pagemap_runs(const unsigned long long *entries, size_t n, unsigned long long any,
                          unsigned long long none, unsigned long long *starts,
                          unsigned long long *counts, size_t max);

/* Runs of pages that two pagemaps (of two processes, the same addresses) map alike: both
 * present with the same page frame, or both swapped to the same slot; no file pages, no pte
 * markers.  Writes at most `max` (first page index, page count) pairs; returns their number. */
size_t hpccr_pagemap_same(const unsigned long long *a, const unsigned long long *b, size_t n,
                          unsigned long long *starts, unsigned long long *counts, size_t max);

/* Sorted, disjoint [start, end) spans, flat (start0, end0, start1, ...): the parts of `a` inside
 * (intersect) or outside (subtract) those of `b`, into `out` (room for na + nb spans); returns
 * their number. */
size_t hpccr_spans_intersect(const uint64_t *a, size_t na, const uint64_t *b, size_t nb,
                             uint64_t *out);
size_t hpccr_spans_subtract(const uint64_t *a, size_t na, const uint64_t *b, size_t nb,
                            uint64_t *out);

/* What an incremental dump leaves to the parent image (dump.py): of the `spans` of pages it
 * saves, those inside `covered`, outside `written` and inside `held` (all sorted, disjoint)
 * go into `inherited` as [start, end) spans, and the others into `saved` as (start, length)
 * pairs; each has room for ns + nc + nw + nh spans.  Returns the number of inherited spans
 * (*nsaved: of saved ones), or -1 if out of memory. */
long hpccr_spans_inherit(const uint64_t *spans, size_t ns, const uint64_t *covered, size_t nc,
                         const uint64_t *written, size_t nw, const uint64_t *held, size_t nh,
                         uint64_t *inherited, uint64_t *saved, size_t *nsaved);

/* statfs(2) f_type of the file system holding `path`, or -errno. */
long hpccr_statfs_type(const char *path);

/* fork() that gives the child exactly pid `pid` (clone3 with set_tid) and the clone `flags`
 * (e.g. CLONE_FS); returns like fork(). */
int hpccr_fork_with_pid(int pid, unsigned long flags);
"""

SOURCE = r"""
#include <errno.h>
#include <limits.h>
#include <linux/sched.h>
#include <linux/userfaultfd.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/vfs.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef __WALL
#define __WALL 0x40000000
#endif

long hpccr_syscall6(long nr, long a1, long a2, long a3, long a4, long a5, long a6)
{
    return syscall(nr, a1, a2, a3, a4, a5, a6);
}

int hpccr_getregset(int tid, int type, void *buf, size_t *len)
{
    struct iovec iov = { buf, *len };
    if (ptrace(PTRACE_GETREGSET, tid, (void *)(long)type, &iov) < 0)
        return -errno;
    *len = iov.iov_len;
    return 0;
}

int hpccr_setregset(int tid, int type, void *buf, size_t len)
{
    struct iovec iov = { buf, len };
    if (ptrace(PTRACE_SETREGSET, tid, (void *)(long)type, &iov) < 0)
        return -errno;
    return 0;
}

int hpccr_wait(int tid, int options)
{
    int status;
    for (;;) {
        int r = waitpid(tid, &status, options | __WALL);
        if (r >= 0)
            return r == 0 ? -EAGAIN : status;
        if (errno != EINTR)
            return -errno;
    }
}

/* Load `base` with a system call `nr` and its arguments, to run at `ip`. */
static int set_call_regs(int tid, unsigned long long ip, const struct user_regs_struct *base,
                         long nr, long a1, long a2, long a3, long a4, long a5, long a6)
{
    struct user_regs_struct regs = *base;
    regs.rax = nr;
    regs.orig_rax = (unsigned long long)-1;
    regs.rdi = a1;
    regs.rsi = a2;
    regs.rdx = a3;
    regs.r10 = a4;
    regs.r8 = a5;
    regs.r9 = a6;
    regs.rip = ip;
    return ptrace(PTRACE_SETREGS, tid, NULL, &regs) < 0 ? -errno : 0;
}

int hpccr_inject(int tid, unsigned long long ip, const struct user_regs_struct *base, long nr,
                 long a1, long a2, long a3, long a4, long a5, long a6, long *ret)
{
    struct user_regs_struct regs;
    int err = set_call_regs(tid, ip, base, nr, a1, a2, a3, a4, a5, a6);
    if (err)
        return err;
    if (ptrace(PTRACE_CONT, tid, NULL, NULL) < 0)
        return -errno;
    for (;;) {
        int status = hpccr_wait(tid, 0);
        if (status < 0)
            return status;
        if (!WIFSTOPPED(status))
            return -ESRCH;
        if (status >> 8 == SIGTRAP)
            break;  /* the int3 after the syscall */
        if (WSTOPSIG(status) == SIGTRAP && (status >> 16) != 0) {
            /* a ptrace event (e.g. PTRACE_EVENT_CLONE of an injected clone3): go on */
            if (ptrace(PTRACE_CONT, tid, NULL, NULL) < 0)
                return -errno;
            continue;
        }
        return -EINTR;  /* any other stop: the caller decides */
    }
    if (ptrace(PTRACE_GETREGS, tid, NULL, &regs) < 0)
        return -errno;
    *ret = (long)regs.rax;
    return 0;
}

#define SYSCALL_STOP (SIGTRAP | 0x80)

int hpccr_next_syscall_exit(int tid, long *ret)
{
    struct user_regs_struct regs;
    for (int stop = 0; stop < 2; stop++) {  /* syscall entry, then exit */
        if (ptrace(PTRACE_SYSCALL, tid, NULL, NULL) < 0)
            return -errno;
        int status = hpccr_wait(tid, 0);
        if (status < 0)
            return status;
        if (!WIFSTOPPED(status))
            return -ESRCH;
        if (WSTOPSIG(status) != SYSCALL_STOP)
            return -EINTR;  /* any other stop: the caller decides */
    }
    if (ptrace(PTRACE_GETREGS, tid, NULL, &regs) < 0)
        return -errno;
    *ret = (long)regs.rax;
    return 0;
}

int hpccr_inject_to_exit(int tid, unsigned long long ip, const struct user_regs_struct *base,
                         long nr, long a1, long a2, long a3, long a4, long a5, long a6,
                         long *ret)
{
    int err = set_call_regs(tid, ip, base, nr, a1, a2, a3, a4, a5, a6);
    if (err)
        return err;
    return hpccr_next_syscall_exit(tid, ret);
}

/* Skip the first `done` bytes of the iovecs iov[0..*k) (after a partial transfer). */
static void skip_iovecs(struct iovec *iov, size_t *k, size_t done)
{
    size_t j = 0;
    while (done >= iov[j].iov_len) {
        done -= iov[j].iov_len;
        j++;
    }
    memmove(iov, iov + j, (*k - j) * sizeof(iov[0]));
    *k -= j;
    iov[0].iov_base = (char *)iov[0].iov_base + done;
    iov[0].iov_len -= done;
}

static long move_ranges(int pid, const unsigned long long *addrs,
                        const unsigned long long *lens, const unsigned long long *offsets,
                        size_t n, char *buf, int write)
{
    struct iovec local[IOV_MAX], remote[IOV_MAX];
    long total = 0;
    size_t i = 0;
    while (i < n) {
        size_t k = 0, bytes = 0;
        while (i + k < n && k < IOV_MAX) {
            remote[k].iov_base = (void *)(uintptr_t)addrs[i + k];
            remote[k].iov_len = lens[i + k];
            if (offsets) {
                local[k].iov_base = buf + offsets[i + k];
                local[k].iov_len = lens[i + k];
            }
            bytes += lens[i + k];
            k++;
        }
        size_t batch = k; /* k and nl shrink below as partial transfers are retried */
        size_t nl = k;
        if (!offsets) {
            local[0].iov_base = buf + total;
            local[0].iov_len = bytes;
            nl = 1;
        }
        size_t done = 0;
        while (done < bytes) {
            ssize_t r = write ? process_vm_writev(pid, local, nl, remote, k, 0)
                              : process_vm_readv(pid, local, nl, remote, k, 0);
            if (r < 0)
                return -errno;
            if (r == 0)
                return -EFAULT;
            done += r;
            if (done < bytes) {
                skip_iovecs(remote, &k, r);
                skip_iovecs(local, &nl, r);
            }
        }
        total += bytes;
        i += batch;
    }
    return total;
}

long hpccr_read_ranges(int pid, const unsigned long long *addrs, const unsigned long long *lens,
                       size_t n, void *buf)
{
    return move_ranges(pid, addrs, lens, NULL, n, buf, 0);
}

long hpccr_write_ranges(int pid, const unsigned long long *addrs,
                        const unsigned long long *lens, const unsigned long long *offsets,
                        size_t n, const void *buf)
{
    return move_ranges(pid, addrs, lens, offsets, n, (char *)buf, 1);
}

long hpccr_place_ranges(int uffd, int pid, const unsigned long long *addrs,
                        const unsigned long long *lens, const unsigned long long *offsets,
                        size_t n, const void *buf)
{
    const unsigned long long page = sysconf(_SC_PAGESIZE);
    long total = 0;

    for (size_t i = 0; i < n; i++) {
        unsigned long long dst = addrs[i], left = lens[i];
        char *src = (char *)buf + (offsets ? offsets[i] : (unsigned long long)total);

        while (left) {
            struct uffdio_copy copy = { .dst = dst, .src = (uintptr_t)src, .len = left };

            if (ioctl(uffd, UFFDIO_COPY, &copy) == 0)
                copy.copy = left;
            else if (copy.copy <= 0) {
                if (errno != EEXIST && errno != ENOENT)
                    return -errno;  /* EAGAIN needs a change of the mm: none while restored */
                unsigned long long len = errno == EEXIST ? page : left;
                long r = move_ranges(pid, &dst, &len, NULL, 1, src, 1);
                if (r < 0)
                    return r;
                copy.copy = len;
            }
            dst += copy.copy;
            src += copy.copy;
            left -= copy.copy;
        }
        total += lens[i];
    }
    return total;
}

long hpccr_uffd_fill(int uffd, unsigned long long dst, const void *src, unsigned long long len,
                     unsigned long long *done)
{
    const unsigned long long page = sysconf(_SC_PAGESIZE);

    *done = 0;
    while (*done < len) {
        long long moved;

        if (src) {
            struct uffdio_copy copy = { .dst = dst + *done, .src = (uintptr_t)src + *done,
                                        .len = len - *done };

            moved = ioctl(uffd, UFFDIO_COPY, &copy) == 0 ? (long long)(len - *done) : copy.copy;
        } else {
            struct uffdio_zeropage zero = { .range = { .start = dst + *done,
                                                       .len = len - *done } };

            moved = ioctl(uffd, UFFDIO_ZEROPAGE, &zero) == 0 ? (long long)(len - *done)
                                                              : zero.zeropage;
        }
        if (moved > 0)
            *done += moved;  /* all, or part of it (then the call failed with EAGAIN) */
        else if (errno == EEXIST)
            *done += page;
        else
            return -errno;
    }
    return 0;
}

size_t hpccr_spans_intersect(const uint64_t *a, size_t na, const uint64_t *b, size_t nb,
                             uint64_t *out)
{
    size_t i = 0, j = 0, n = 0;

    while (i < na && j < nb) {
        uint64_t start = a[2 * i] > b[2 * j] ? a[2 * i] : b[2 * j];
        uint64_t end = a[2 * i + 1] < b[2 * j + 1] ? a[2 * i + 1] : b[2 * j + 1];

        if (start < end) {
            out[2 * n] = start;
            out[2 * n + 1] = end;
            n++;
        }
        if (a[2 * i + 1] < b[2 * j + 1])
            i++;
        else
            j++;
    }
    return n;
}

size_t hpccr_spans_subtract(const uint64_t *a, size_t na, const uint64_t *b, size_t nb,
                            uint64_t *out)
{
    size_t j = 0, n = 0;

    for (size_t i = 0; i < na; i++) {
        uint64_t start = a[2 * i], end = a[2 * i + 1];

        while (j < nb && b[2 * j + 1] <= start)
            j++;
        for (size_t k = j; start < end; k++) {
            if (k == nb || b[2 * k] >= end) {
                out[2 * n] = start;
                out[2 * n + 1] = end;
                n++;
                break;
            }
            if (b[2 * k] > start) {
                out[2 * n] = start;
                out[2 * n + 1] = b[2 * k];
                n++;
            }
            if (b[2 * k + 1] > start)
                start = b[2 * k + 1];
        }
    }
    return n;
}

long hpccr_spans_inherit(const uint64_t *spans, size_t ns, const uint64_t *covered, size_t nc,
                         const uint64_t *written, size_t nw, const uint64_t *held, size_t nh,
                         uint64_t *inherited, uint64_t *saved, size_t *nsaved)
{
    size_t room = ns + nc + nw + nh, n;
    uint64_t *one = malloc(2 * sizeof(uint64_t) * (room + 1));
    uint64_t *two = malloc(2 * sizeof(uint64_t) * (room + 1));

    if (!one || !two) {
        free(one);
        free(two);
        return -1;
    }
    n = hpccr_spans_intersect(spans, ns, covered, nc, one);
    n = hpccr_spans_subtract(one, n, written, nw, two);
    n = hpccr_spans_intersect(two, n, held, nh, inherited);
    *nsaved = hpccr_spans_subtract(spans, ns, inherited, n, saved);
    for (size_t i = 0; i < *nsaved; i++)
        saved[2 * i + 1] -= saved[2 * i];
    free(one);
    free(two);
    return n;
}

/* A pte marker (swap type 31, SWP_PTE_MARKER) shows as a swapped page without being one: e.g.
 * the marker of a never-touched page write-protected by userfaultfd (engine/tracking.py). */
#define PTE_MARKER(e) (((e) >> 62 & 1) && ((e) & 0x1f) == 0x1f)

/* The indices i < n for which in(i, ctx) holds, as runs (first index, count): at most `max`;
 * returns their number. */
static inline size_t collect_runs(size_t n, int (*in)(size_t, const void *), const void *ctx,
                                  unsigned long long *starts, unsigned long long *counts,
                                  size_t max)
{
    size_t runs = 0, i = 0;
    while (i < n && runs < max) {
        while (i < n && !in(i, ctx))
            i++;
        if (i == n)
            break;
        size_t start = i;
        while (i < n && in(i, ctx))
            i++;
        starts[runs] = start;
        counts[runs] = i - start;
        runs++;
    }
    return runs;
}

struct selection {
    const unsigned long long *entries;
    unsigned long long any, none;
};

static int selected(size_t i, const void *ctx)
{
    const struct selection *s = ctx;
    unsigned long long e = s->entries[i];
    return (e & s->any) && !(e & s->none) && !PTE_MARKER(e);
}

size_t hpccr_pagemap_runs(const unsigned long long *entries, size_t n, unsigned long long any,
                          unsigned long long none, unsigned long long *starts,
                          unsigned long long *counts, size_t max)
{
    struct selection s = { entries, any, none };
    return collect_runs(n, selected, &s, starts, counts, max);
}

/* Bits 0-54: the page frame of a present page, the swap type and offset of a swapped one;
 * with bits 61-63 (file page, swapped, present): which page it is, not how it is mapped. */
#define FRAME(e) ((e) & ((1ULL << 55) - 1))
#define PAGE_ID(e) ((e) & (((1ULL << 55) - 1) | 7ULL << 61))

static int same_page(size_t i, const void *ctx)
{
    const unsigned long long *const *pair = ctx;
    unsigned long long x = pair[0][i], y = pair[1][i];
    return x >> 62 && !(x >> 61 & 1) && FRAME(x) && !PTE_MARKER(x) && PAGE_ID(x) == PAGE_ID(y);
}

size_t hpccr_pagemap_same(const unsigned long long *a, const unsigned long long *b, size_t n,
                          unsigned long long *starts, unsigned long long *counts, size_t max)
{
    const unsigned long long *pair[2] = { a, b };
    return collect_runs(n, same_page, pair, starts, counts, max);
}

long hpccr_statfs_type(const char *path)
{
    struct statfs st;
    if (statfs(path, &st) < 0)
        return -errno;
    return st.f_type;
}

/* From Python.h; declared here since cffi may build against the limited API.  cffi calls C
 * with the GIL released, and these fork hooks (what os.fork runs) need it held. */
void PyOS_BeforeFork(void);
void PyOS_AfterFork_Parent(void);
void PyOS_AfterFork_Child(void);

int hpccr_fork_with_pid(int pid, unsigned long flags)
{
    pid_t tid = pid;
    struct clone_args args;
    memset(&args, 0, sizeof(args));
    args.flags = flags;
    args.exit_signal = SIGCHLD;
    args.set_tid = (uintptr_t)&tid;
    args.set_tid_size = 1;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyOS_BeforeFork();
    long r = syscall(SYS_clone3, &args, sizeof(args));
    int saved = errno;
    if (r == 0)
        PyOS_AfterFork_Child();
    else
        PyOS_AfterFork_Parent();
    PyGILState_Release(gil);
    errno = saved;
    return (int)r;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("hpccr.native._hpccr_native", SOURCE)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
