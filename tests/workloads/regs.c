/*
 * Threads and registers: 4 threads (the leader and 3 others) each load distinct known values
 * into the vector registers (zmm0-31 and k0-7 with AVX-512, else ymm0-15) and into rbx, rdx,
 * r8-r10, r12-r15, then sleep 3 s in a raw nanosleep syscall inside the same asm block, then
 * store the registers back and compare.  Each thread also checks its tid (gettid) and its name
 * (PR_SET_NAME), and the leader checks the set of tids in /proc/self/task and their names.
 * Prints "MODE avx512|avx", "TIDS <leader> <t1> <t2> <t3>" before and after.
 */
#include "wl.h"

#include <dirent.h>
#include <stddef.h>
#include <sys/prctl.h>

#define NTHREADS 4
#define NGPR 9

struct regs {
	struct timespec req;	/* must come first: the asm passes the struct as nanosleep's arg */
	long ret;
	uint64_t zin[32][8] __attribute__((aligned(64)));
	uint64_t zout[32][8] __attribute__((aligned(64)));
	uint64_t kin[8], kout[8];
	uint64_t gin[NGPR], gout[NGPR];
};

static struct regs regs[NTHREADS];
static pid_t tids[NTHREADS], tids_after[NTHREADS];
static pthread_barrier_t sync_point;
static int avx512;

#define LOAD_GPRS \
	"mov %c[gin]+0*8(%%rdi), %%rbx\n\t" \
	"mov %c[gin]+1*8(%%rdi), %%rdx\n\t" \
	"mov %c[gin]+2*8(%%rdi), %%r8\n\t" \
	"mov %c[gin]+3*8(%%rdi), %%r9\n\t" \
	"mov %c[gin]+4*8(%%rdi), %%r10\n\t" \
	"mov %c[gin]+5*8(%%rdi), %%r12\n\t" \
	"mov %c[gin]+6*8(%%rdi), %%r13\n\t" \
	"mov %c[gin]+7*8(%%rdi), %%r14\n\t" \
	"mov %c[gin]+8*8(%%rdi), %%r15\n\t"

#define STORE_GPRS \
	"mov %%rbx, %c[gout]+0*8(%%rdi)\n\t" \
	"mov %%rdx, %c[gout]+1*8(%%rdi)\n\t" \
	"mov %%r8, %c[gout]+2*8(%%rdi)\n\t" \
	"mov %%r9, %c[gout]+3*8(%%rdi)\n\t" \
	"mov %%r10, %c[gout]+4*8(%%rdi)\n\t" \
	"mov %%r12, %c[gout]+5*8(%%rdi)\n\t" \
	"mov %%r13, %c[gout]+6*8(%%rdi)\n\t" \
	"mov %%r14, %c[gout]+7*8(%%rdi)\n\t" \
	"mov %%r15, %c[gout]+8*8(%%rdi)\n\t"

/* nanosleep(&r->req, NULL): rdi already points to r; rax comes back as the result. */
#define SLEEP \
	"mov %[nr], %%eax\n\t" \
	"xor %%esi, %%esi\n\t" \
	"syscall\n\t" \
	"mov %%rax, %c[ret](%%rdi)\n\t"

#define OFFSETS \
	[zin] "i"(offsetof(struct regs, zin)), [zout] "i"(offsetof(struct regs, zout)), \
	[kin] "i"(offsetof(struct regs, kin)), [kout] "i"(offsetof(struct regs, kout)), \
	[gin] "i"(offsetof(struct regs, gin)), [gout] "i"(offsetof(struct regs, gout)), \
	[ret] "i"(offsetof(struct regs, ret)), [nr] "i"(SYS_nanosleep)

#define GPR_CLOBBERS \
	"rax", "rbx", "rcx", "rdx", "rsi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"

__attribute__((target("avx512f,avx512bw")))
static void hold_avx512(struct regs *r)
{
	asm volatile(
		".irp i,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31\n\t"
		"vmovdqu64 %c[zin]+\\i*64(%%rdi), %%zmm\\i\n\t"
		".endr\n\t"
		".irp i,0,1,2,3,4,5,6,7\n\t"
		"kmovq %c[kin]+\\i*8(%%rdi), %%k\\i\n\t"
		".endr\n\t"
		LOAD_GPRS
		SLEEP
		STORE_GPRS
		".irp i,0,1,2,3,4,5,6,7\n\t"
		"kmovq %%k\\i, %c[kout]+\\i*8(%%rdi)\n\t"
		".endr\n\t"
		".irp i,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31\n\t"
		"vmovdqu64 %%zmm\\i, %c[zout]+\\i*64(%%rdi)\n\t"
		".endr\n\t"
		"vzeroupper\n\t"
		: : "D"(r), OFFSETS
		: GPR_CLOBBERS, "memory",
		  "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",
		  "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15",
		  "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23",
		  "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31",
		  "k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7");
}

__attribute__((target("avx")))
static void hold_avx(struct regs *r)
{
	asm volatile(
		".irp i,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15\n\t"
		"vmovdqu %c[zin]+\\i*64(%%rdi), %%ymm\\i\n\t"
		".endr\n\t"
		LOAD_GPRS
		SLEEP
		STORE_GPRS
		".irp i,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15\n\t"
		"vmovdqu %%ymm\\i, %c[zout]+\\i*64(%%rdi)\n\t"
		".endr\n\t"
		"vzeroupper\n\t"
		: : "D"(r), OFFSETS
		: GPR_CLOBBERS, "memory",
		  "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",
		  "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
}

static void name_of(int idx, char *name)
{
	snprintf(name, 16, "regs-%d", idx);
}

/* Everything a thread does: the values it loads depend on its index, so no two are alike. */
static void *run(void *arg)
{
	int idx = (int)(intptr_t)arg, vec = avx512 ? 32 : 16, words = avx512 ? 8 : 4;
	struct regs *r = &regs[idx];
	char name[16], now[16] = "";

	name_of(idx, name);
	prctl(PR_SET_NAME, name);
	tids[idx] = wl_gettid();
	r->req.tv_sec = 3;
	for (int i = 0; i < 32; i++)
		for (int j = 0; j < 8; j++)
			r->zin[i][j] = 0x9E3779B97F4A7C15ULL * (idx * 256 + i * 8 + j + 1);
	for (int i = 0; i < 8; i++)
		r->kin[i] = 0xC0FFEE0000000000ULL ^ ((uint64_t)idx << 32) ^ (i * 0x01010101ULL);
	for (int i = 0; i < NGPR; i++)
		r->gin[i] = 0xDEADBEEF00000000ULL ^ ((uint64_t)idx << 40) ^ (i * 0x1111ULL);

	pthread_barrier_wait(&sync_point);
	if (!idx) {
		printf("TIDS %d %d %d %d\n", tids[0], tids[1], tids[2], tids[3]);
		wl_ready();
	}
	if (avx512)
		hold_avx512(r);
	else
		hold_avx(r);

	WL_CHECK(r->ret == 0, "thread %d: nanosleep returned %ld", idx, r->ret);
	for (int i = 0; i < vec; i++)
		for (int j = 0; j < words; j++)
			WL_CHECK(r->zout[i][j] == r->zin[i][j],
				 "thread %d: vector register %d word %d is %016llx, not %016llx", idx,
				 i, j, (unsigned long long)r->zout[i][j],
				 (unsigned long long)r->zin[i][j]);
	for (int i = 0; avx512 && i < 8; i++)
		WL_CHECK(r->kout[i] == r->kin[i], "thread %d: k%d is %016llx, not %016llx", idx,
			 i, (unsigned long long)r->kout[i], (unsigned long long)r->kin[i]);
	for (int i = 0; i < NGPR; i++)
		WL_CHECK(r->gout[i] == r->gin[i], "thread %d: general register %d is %016llx",
			 idx, i, (unsigned long long)r->gout[i]);
	tids_after[idx] = wl_gettid();
	WL_CHECK(tids_after[idx] == tids[idx], "thread %d: tid %d became %d", idx, tids[idx],
		 tids_after[idx]);
	prctl(PR_GET_NAME, now);
	WL_CHECK(!strcmp(now, name), "thread %d: name %s became %s", idx, name, now);
	if (idx) {
		/* Stay alive until the leader has looked at /proc/self/task. */
		pthread_barrier_wait(&sync_point);
		pthread_barrier_wait(&sync_point);
	}
	return NULL;
}

/* From the leader: /proc/self/task lists exactly our tids, under the names they gave. */
static void check_tasks(void)
{
	char path[64], name[16], comm[32];
	struct dirent *d;
	int count = 0;
	DIR *dir;
	FILE *f;

	dir = opendir("/proc/self/task");
	while (dir && (d = readdir(dir)))
		count += d->d_name[0] != '.';
	if (dir)
		closedir(dir);
	WL_CHECK(count == NTHREADS, "%d tasks, not %d", count, NTHREADS);
	for (int i = 0; i < NTHREADS; i++) {
		snprintf(path, sizeof(path), "/proc/self/task/%d/comm", tids[i]);
		f = fopen(path, "r");
		if (!f) {
			wl_fail("no task %d", tids[i]);
			continue;
		}
		if (!fgets(comm, sizeof(comm), f))
			comm[0] = 0;
		fclose(f);
		comm[strcspn(comm, "\n")] = 0;
		name_of(i, name);
		WL_CHECK(!strcmp(comm, name), "task %d is named %s, not %s", tids[i], comm, name);
	}
}

int main(void)
{
	pthread_t threads[NTHREADS];

	__builtin_cpu_init();
	avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
	printf("MODE %s\n", avx512 ? "avx512" : "avx");
	pthread_barrier_init(&sync_point, NULL, NTHREADS);
	for (int i = 1; i < NTHREADS; i++)
		if (pthread_create(&threads[i], NULL, run, (void *)(intptr_t)i))
			wl_die("pthread_create");
	run(0);
	pthread_barrier_wait(&sync_point);
	check_tasks();
	pthread_barrier_wait(&sync_point);
	for (int i = 1; i < NTHREADS; i++)
		pthread_join(threads[i], NULL);
	printf("TIDS %d %d %d %d\n", tids_after[0], tids_after[1], tids_after[2], tids_after[3]);
	return wl_finish();
}
