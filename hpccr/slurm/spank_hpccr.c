/* spank_hpccr: `sbatch --checkpoint=<interval> [--checkpoint-dir=<dir>] job.sh` runs job.sh
 * under hpccr, unchanged.
 *
 * plugstack.conf:  optional /path/spank_hpccr.so job=/path/etc/slurm/job.sh
 *
 * Allocator/local context (sbatch, salloc, srun): the option callbacks check the values, so a
 * bad one fails the submission with a clear message, and init_post_opt puts them into the job
 * control environment (SPANK_HPCCR_CHECKPOINT_INTERVAL / _DIR in the prolog and epilog).
 *
 * Remote context (slurmstepd): sbatch hands the options on in the job environment and the
 * callbacks run again.  user_init sets HPCCR_CHECKPOINT_INTERVAL (in seconds, "1800s") and
 * HPCCR_CHECKPOINT_DIR in the step's environment.  For the batch step only, task_init — which
 * runs in the task process as the user, just before slurmstepd's execve(argv[0], argv, env) —
 * replaces argv[0], the path of the batch script, with the job= wrapper and passes the
 * script's path in HPCCR_JOB_SCRIPT: the wrapper runs `hpccr slurm job -- <script> <args>`.
 * The argument vector cannot grow (slurmstepd owns it), but one of its entries can be
 * replaced; everything slurmstepd does after task_init (task prolog, TMPDIR, the user's
 * rlimits) still applies to the job.  srun steps inside the job are not wrapped.
 */
#include <ctype.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <slurm/slurm.h>
#include <slurm/spank.h>

SPANK_PLUGIN(hpccr, 1);

#define MAX_SECONDS (100L * 365 * 86400)

static long interval;          /* seconds, 0 when --checkpoint was not given */
static char *checkpoint_dir;   /* NULL when --checkpoint-dir was not given */
static char *job_wrapper;      /* from the plugstack.conf argument job=<path> */

/* A run of decimal digits at *p, advancing *p; -1 if none or absurdly long. */
static long number(const char **p)
{
	long n = 0;
	int digits = 0;

	while (isdigit((unsigned char)**p)) {
		if (++digits > 10)
			return -1;
		n = n * 10 + (*(*p)++ - '0');
	}
	return digits ? n : -1;
}

/* Seconds in text, read as hpccr/duration.py reads it: 90s, 30m, 2h, 1d, or Slurm's
 * minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.  0 if it is not a positive duration. */
static long parse_duration(const char *text)
{
	const char *p = text, *end = text + strlen(text);
	long days = -1, part[3], seconds;
	int nparts = 0;

	while (isspace((unsigned char)*p))
		p++;
	while (end > p && isspace((unsigned char)end[-1]))
		end--;
	if ((part[0] = number(&p)) < 0)
		return 0;
	if (p + 1 == end && strchr("smhd", *p)) {
		long unit = *p == 's' ? 1 : *p == 'm' ? 60 : *p == 'h' ? 3600 : 86400;

		seconds = part[0] * unit;
		return seconds <= MAX_SECONDS ? seconds : 0;
	}
	if (*p == '-') {
		days = part[0];
		p++;
		if ((part[0] = number(&p)) < 0)
			return 0;
	}
	nparts = 1;
	while (p < end && *p == ':' && nparts < 3) {
		p++;
		if ((part[nparts++] = number(&p)) < 0)
			return 0;
	}
	if (p != end)
		return 0;
	if (days >= 0) {
		seconds = days * 86400 + part[0] * 3600;
		if (nparts > 1)
			seconds += part[1] * 60;
		if (nparts > 2)
			seconds += part[2];
	} else if (nparts == 1) {
		seconds = part[0] * 60;
	} else if (nparts == 2) {
		seconds = part[0] * 60 + part[1];
	} else {
		seconds = part[0] * 3600 + part[1] * 60 + part[2];
	}
	return seconds > 0 && seconds <= MAX_SECONDS ? seconds : 0;
}

static int checkpoint_cb(int val, const char *optarg, int remote)
{
	(void)val;
	(void)remote;
	interval = optarg ? parse_duration(optarg) : 0;
	if (interval == 0) {
		slurm_error("hpccr: --checkpoint: '%s' is not a positive duration (e.g. 90s, 30m, "
			    "2h, MM:SS, HH:MM:SS, D-HH)", optarg ? optarg : "");
		return -1;
	}
	return 0;
}

static int checkpoint_dir_cb(int val, const char *optarg, int remote)
{
	(void)val;
	(void)remote;
	if (!optarg || optarg[0] != '/') {
		slurm_error("hpccr: --checkpoint-dir: '%s' is not an absolute path",
			    optarg ? optarg : "");
		return -1;
	}
	free(checkpoint_dir);
	checkpoint_dir = strdup(optarg);
	return 0;
}

static struct spank_option options[] = {
	{ "checkpoint", "interval",
	  "Run the job under hpccr and checkpoint it every <interval> (90s, 30m, 2h, MM:SS, "
	  "HH:MM:SS, D-HH; a bare number is minutes); a requeued job restarts from its newest "
	  "checkpoint.", 1, 0, checkpoint_cb },
	{ "checkpoint-dir", "dir",
	  "Keep the job's hpccr checkpoints in <dir> (an absolute path) instead of the site's "
	  "per-job directory; implies running under hpccr.", 1, 0, checkpoint_dir_cb },
	SPANK_OPTIONS_TABLE_END
};

static int wanted(void)
{
	return interval > 0 || checkpoint_dir != NULL;
}

int slurm_spank_init(spank_t sp, int ac, char **av)
{
	for (int i = 0; i < ac; i++) {
		if (strncmp(av[i], "job=", 4) == 0) {
			free(job_wrapper);
			job_wrapper = strdup(av[i] + 4);
		} else {
			slurm_error("hpccr: unknown plugstack.conf argument '%s' (want job=<path>)",
				    av[i]);
			return -1;
		}
	}
	for (struct spank_option *opt = options; opt->name; opt++) {
		if (spank_option_register(sp, opt) != ESPANK_SUCCESS) {
			slurm_error("hpccr: cannot register --%s", opt->name);
			return -1;
		}
	}
	return 0;
}

/* sbatch/salloc/srun: tell the prolog and epilog (SPANK_HPCCR_CHECKPOINT_*). */
int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
{
	char seconds[32];

	(void)ac;
	(void)av;
	if (spank_remote(sp) || !wanted())
		return 0;
	if (interval > 0) {
		snprintf(seconds, sizeof(seconds), "%lds", interval);
		spank_job_control_setenv(sp, "HPCCR_CHECKPOINT_INTERVAL", seconds, 1);
	}
	if (checkpoint_dir)
		spank_job_control_setenv(sp, "HPCCR_CHECKPOINT_DIR", checkpoint_dir, 1);
	return 0;
}

/* slurmstepd, once per step before its tasks start: the job's own environment. */
int slurm_spank_user_init(spank_t sp, int ac, char **av)
{
	char seconds[32];

	(void)ac;
	(void)av;
	if (!wanted())
		return 0;
	if (interval > 0) {
		snprintf(seconds, sizeof(seconds), "%lds", interval);
		spank_setenv(sp, "HPCCR_CHECKPOINT_INTERVAL", seconds, 1);
	}
	if (checkpoint_dir)
		spank_setenv(sp, "HPCCR_CHECKPOINT_DIR", checkpoint_dir, 1);
	return 0;
}

/* In the batch step's task, as the user, right before slurmstepd execs argv[0]. */
int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
	uint32_t step;
	int argc;
	char **argv, *wrapper;

	(void)ac;
	(void)av;
	if (!wanted() || spank_get_item(sp, S_JOB_STEPID, &step) != ESPANK_SUCCESS ||
	    step != SLURM_BATCH_SCRIPT)
		return 0;
	if (!job_wrapper || access(job_wrapper, X_OK) != 0) {
		slurm_error("hpccr: job wrapper '%s' is not executable: the job runs without "
			    "checkpoints (set job=<path> in plugstack.conf)",
			    job_wrapper ? job_wrapper : "");
		return 0;
	}
	if (spank_get_item(sp, S_JOB_ARGV, &argc, &argv) != ESPANK_SUCCESS || argc < 1 ||
	    !(wrapper = strdup(job_wrapper)))
		return 0;
	if (spank_setenv(sp, "HPCCR_JOB_SCRIPT", argv[0], 1) != ESPANK_SUCCESS)
		return 0;
	argv[0] = wrapper; /* this process execs it next; nothing else frees argv[0] here */
	return 0;
}
