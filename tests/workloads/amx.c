/*
 * AMX: two threads each configure the tiles (ldtilecfg), load known data into tmm0-7, sleep 3 s
 * in a raw nanosleep syscall inside the same asm block, then store the tiles and the tile
 * configuration back and compare.  Needs a CPU with amx_tile (the test skips otherwise).
 */
#include "wl.h"

#include <stddef.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define NTHREADS 2
#define NTILES 8
#define ROWS 16
#define ROW_BYTES 64

struct tilecfg {
	uint8_t palette;
	uint8_t start_row;
	uint8_t reserved[14];
	uint16_t colsb[16];
	uint8_t rows[16];
};

struct amx {
	struct timespec req;	/* must come first: the asm passes the struct as nanosleep's arg */
	long ret;
	struct tilecfg cfg __attribute__((aligned(64)));
	struct tilecfg cfg_out __attribute__((aligned(64)));
	uint8_t tin[NTILES][ROWS * ROW_BYTES] __attribute__((aligned(64)));
	uint8_t tout[NTILES][ROWS * ROW_BYTES] __attribute__((aligned(64)));
};

static struct amx amx[NTHREADS];
static pthread_barrier_t started;

static void hold_tiles(struct amx *a)
{
	asm volatile(
		"ldtilecfg %c[cfg](%%rdi)\n\t"
		"mov $64, %%edx\n\t"
		".irp i,0,1,2,3,4,5,6,7\n\t"
		"tileloadd %c[tin]+\\i*1024(%%rdi,%%rdx,1), %%tmm\\i\n\t"
		".endr\n\t"
		"mov %[nr], %%eax\n\t"
		"xor %%esi, %%esi\n\t"
		"syscall\n\t"
		"mov %%rax, %c[ret](%%rdi)\n\t"
		".irp i,0,1,2,3,4,5,6,7\n\t"
		"tilestored %%tmm\\i, %c[tout]+\\i*1024(%%rdi,%%rdx,1)\n\t"
		".endr\n\t"
		"sttilecfg %c[cfg_out](%%rdi)\n\t"
		"tilerelease\n\t"
		: : "D"(a), [cfg] "i"(offsetof(struct amx, cfg)),
		  [cfg_out] "i"(offsetof(struct amx, cfg_out)), [tin] "i"(offsetof(struct amx, tin)),
		  [tout] "i"(offsetof(struct amx, tout)), [ret] "i"(offsetof(struct amx, ret)),
		  [nr] "i"(SYS_nanosleep)
		: "rax", "rcx", "rdx", "rsi", "r11", "memory");
}

static void *run(void *arg)
{
	int idx = (int)(intptr_t)arg;
	struct amx *a = &amx[idx];

	a->req.tv_sec = 3;
	a->cfg.palette = 1;
	for (int t = 0; t < NTILES; t++) {
		a->cfg.colsb[t] = ROW_BYTES;
		a->cfg.rows[t] = ROWS;
	}
	wl_fill(a->tin, sizeof(a->tin), 700 + idx);
	pthread_barrier_wait(&started);
	if (!idx)
		wl_ready();
	hold_tiles(a);

	WL_CHECK(a->ret == 0, "thread %d: nanosleep returned %ld", idx, a->ret);
	WL_CHECK(!memcmp(&a->cfg, &a->cfg_out, sizeof(a->cfg)), "thread %d: tile config differs",
		 idx);
	for (int t = 0; t < NTILES; t++)
		WL_CHECK(!memcmp(a->tin[t], a->tout[t], sizeof(a->tin[t])),
			 "thread %d: tile %d differs", idx, t);
	return NULL;
}

int main(void)
{
	pthread_t thread;

	if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA))
		wl_die("ARCH_REQ_XCOMP_PERM");
	pthread_barrier_init(&started, NULL, NTHREADS);
	if (pthread_create(&thread, NULL, run, (void *)1))
		wl_die("pthread_create");
	run(0);
	pthread_join(thread, NULL);
	return wl_finish();
}
