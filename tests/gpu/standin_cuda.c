/* A stand-in for NVIDIA's libcuda, built by tests/test_gpu.py for the tests of hpccr's GPU
 * support on machines without a GPU (HPCCR_GPU_LIBRARY points hpccr at it).
 *
 * Its checkpoint calls act on a test program that plays a CUDA process (workloads/gpu_job.py):
 * each call writes the action into HPCCR_STANDIN_DIR/<pid>.request, sends the process SIGUSR1
 * and waits until HPCCR_STANDIN_DIR/<pid>.state says the action is done (<pid> as the process
 * sees itself).  The program takes a request only between its "kernels", so a kernel that does
 * not end makes a lock time out, as with the real driver.  Every call is logged, one line each,
 * in HPCCR_STANDIN_DIR/calls.  HPCCR_STANDIN_FAIL=<action> makes that call fail
 * (CUDA_ERROR_ILLEGAL_STATE) without acting; HPCCR_STANDIN_GPUS="GPU-<uuid>=<model>,..." are
 * the GPUs the device calls show.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef struct { unsigned char bytes[16]; } CUuuid;
typedef struct { unsigned int timeoutMs; unsigned int reserved0; uint64_t reserved1[7]; }
    CUcheckpointLockArgs;
typedef struct { CUuuid oldUuid; CUuuid newUuid; } CUcheckpointGpuPair;
typedef struct { CUcheckpointGpuPair *gpuPairs; unsigned int gpuPairsCount; char reserved[44];
                 uint64_t reserved1; } CUcheckpointRestoreArgs;

enum { SUCCESS = 0, INVALID_VALUE = 1, NOT_INITIALIZED = 3, ILLEGAL_STATE = 401,
       TIMEOUT = 909 };
#define CALL_TIMEOUT_MS 30000
#define MAX_GPUS 16

static int initialized;

static const char *dir(void) { return getenv("HPCCR_STANDIN_DIR"); }

static void log_call(const char *action, int pid, const char *extra) {
    char path[4096], line[1024];
    int n = snprintf(line, sizeof line, "%s %d%s\n", action, pid, extra);
    snprintf(path, sizeof path, "%s/calls", dir());
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd >= 0) {
        if (write(fd, line, n) != n) { /* the test sees the line missing */ }
        close(fd);
    }
}

/* The pid as the process sees itself (the last NSpid), -1 if there is no such process. */
static int own_pid(int pid) {
    char path[64], line[512];
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "re");
    int found = -1;
    if (!f) return -1;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "NSpid:", 6)) continue;
        char *last = strrchr(line, '\t');
        found = atoi(last ? last + 1 : line + 6);
    }
    fclose(f);
    return found;
}

static int read_state(int self, char *buf, size_t size) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%d.state", dir(), self);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, size - 1);
    close(fd);
    if (n < 0) return -1;
    buf[n] = 0;
    return 0;
}

static void write_request(int self, const char *action) {
    char path[4096], tmp[4096];
    snprintf(path, sizeof path, "%s/%d.request", dir(), self);
    snprintf(tmp, sizeof tmp, "%s/%d.request.tmp", dir(), self);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return;
    if (write(fd, action, strlen(action)) < 0) { /* the wait below times out */ }
    close(fd);
    rename(tmp, path);
}

static long elapsed_ms(const struct timespec *since) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - since->tv_sec) * 1000 + (now.tv_nsec - since->tv_nsec) / 1000000;
}

/* Ask process `pid` to do `action` and wait until its state is `done`. */
static CUresult act(int pid, const char *action, const char *done, long timeout_ms,
                    const char *extra) {
    const char *fail = getenv("HPCCR_STANDIN_FAIL");
    char state[64];
    struct timespec started;
    if (!initialized) return NOT_INITIALIZED;
    int self = own_pid(pid);
    if (self < 0 || read_state(self, state, sizeof state)) {
        log_call(action, pid, " not-a-cuda-process");
        return INVALID_VALUE;
    }
    if (fail && !strcmp(fail, action)) {
        log_call(action, pid, " failed");
        return ILLEGAL_STATE;
    }
    log_call(action, pid, extra);
    write_request(self, action);
    clock_gettime(CLOCK_MONOTONIC, &started);
    if (kill(pid, SIGUSR1)) return INVALID_VALUE;
    for (;;) {
        if (!read_state(self, state, sizeof state) && !strcmp(state, done)) return SUCCESS;
        if (timeout_ms && elapsed_ms(&started) > timeout_ms) {
            write_request(self, "none");  /* withdrawn: taken later, it does nothing */
            log_call(action, pid, " timed-out");
            return TIMEOUT;
        }
        usleep(1000);
    }
}

CUresult cuInit(unsigned int flags) {
    (void)flags;
    if (!dir()) return NOT_INITIALIZED;
    initialized = 1;
    return SUCCESS;
}

CUresult cuDriverGetVersion(int *version) {
    *version = 12080;
    return SUCCESS;
}

CUresult cuGetErrorName(CUresult error, const char **name) {
    switch (error) {
    case SUCCESS: *name = "CUDA_SUCCESS"; return SUCCESS;
    case INVALID_VALUE: *name = "CUDA_ERROR_INVALID_VALUE"; return SUCCESS;
    case NOT_INITIALIZED: *name = "CUDA_ERROR_NOT_INITIALIZED"; return SUCCESS;
    case ILLEGAL_STATE: *name = "CUDA_ERROR_ILLEGAL_STATE"; return SUCCESS;
    case TIMEOUT: *name = "CUDA_ERROR_TIMEOUT"; return SUCCESS;
    }
    *name = NULL;
    return INVALID_VALUE;
}

/* The i-th GPU of HPCCR_STANDIN_GPUS: its uuid text and model; 0 if there is none. */
static int gpu(int i, char *uuid, size_t uuid_size, char *model, size_t model_size) {
    const char *p = getenv("HPCCR_STANDIN_GPUS");
    for (; p && *p && i > 0; i--) {
        p = strchr(p, ',');
        p = p ? p + 1 : NULL;
    }
    if (!p || !*p) return 0;
    const char *eq = strchr(p, '='), *end = strchr(p, ',');
    if (!end) end = p + strlen(p);
    if (!eq || eq > end) return 0;
    snprintf(uuid, uuid_size, "%.*s", (int)(eq - p), p);
    snprintf(model, model_size, "%.*s", (int)(end - eq - 1), eq + 1);
    return 1;
}

CUresult cuDeviceGetCount(int *count) {
    char uuid[64], model[256];
    if (!initialized) return NOT_INITIALIZED;
    for (*count = 0; gpu(*count, uuid, sizeof uuid, model, sizeof model); ++*count) {}
    return SUCCESS;
}

CUresult cuDeviceGet(CUdevice *device, int ordinal) {
    char uuid[64], model[256];
    if (!gpu(ordinal, uuid, sizeof uuid, model, sizeof model)) return INVALID_VALUE;
    *device = ordinal;
    return SUCCESS;
}

CUresult cuDeviceGetName(char *name, int len, CUdevice device) {
    char uuid[64];
    return gpu(device, uuid, sizeof uuid, name, len) ? SUCCESS : INVALID_VALUE;
}

CUresult cuDeviceGetUuid(CUuuid *out, CUdevice device) {
    char uuid[64], model[256], *p = uuid + 4;  /* after "GPU-" */
    if (!gpu(device, uuid, sizeof uuid, model, sizeof model)) return INVALID_VALUE;
    for (int i = 0; i < 16; i++) {
        if (*p == '-') p++;
        unsigned byte;
        if (sscanf(p, "%2x", &byte) != 1) return INVALID_VALUE;
        out->bytes[i] = byte;
        p += 2;
    }
    return SUCCESS;
}

CUresult cuCheckpointProcessGetState(int pid, int *state) {
    static const char *names[] = {"running", "locked", "checkpointed"};
    char text[64];
    int self = own_pid(pid);
    if (!initialized) return NOT_INITIALIZED;
    if (self < 0 || read_state(self, text, sizeof text)) return INVALID_VALUE;
    for (int i = 0; i < 3; i++)
        if (!strcmp(text, names[i])) {
            *state = i;
            return SUCCESS;
        }
    return INVALID_VALUE;
}

CUresult cuCheckpointProcessLock(int pid, CUcheckpointLockArgs *args) {
    return act(pid, "lock", "locked", args ? args->timeoutMs : 0, "");
}

CUresult cuCheckpointProcessCheckpoint(int pid, void *args) {
    (void)args;
    return act(pid, "checkpoint", "checkpointed", CALL_TIMEOUT_MS, "");
}

static void uuid_text(const CUuuid *uuid, char *out) {
    static const int dash_after[] = {4, 6, 8, 10};
    out += sprintf(out, "GPU-");
    for (int i = 0, d = 0; i < 16; i++) {
        if (d < 4 && i == dash_after[d]) { *out++ = '-'; d++; }
        out += sprintf(out, "%02x", uuid->bytes[i]);
    }
}

CUresult cuCheckpointProcessRestore(int pid, CUcheckpointRestoreArgs *args) {
    char extra[MAX_GPUS * 96 + 8] = "", *p = extra;
    unsigned count = args ? args->gpuPairsCount : 0;
    if (count > MAX_GPUS) return INVALID_VALUE;
    for (unsigned i = 0; i < count; i++) {
        p += sprintf(p, i ? "," : " ");
        uuid_text(&args->gpuPairs[i].oldUuid, p);
        p += strlen(p);
        *p++ = '>';
        uuid_text(&args->gpuPairs[i].newUuid, p);
        p += strlen(p);
    }
    return act(pid, "restore", "locked", CALL_TIMEOUT_MS, extra);
}

CUresult cuCheckpointProcessUnlock(int pid, void *args) {
    (void)args;
    return act(pid, "unlock", "running", CALL_TIMEOUT_MS, "");
}
