/* hpccr-init: pid 1 of a job started by `hpccr run` in its own pid namespace.
 *
 * It starts the job's command as its only child, passes the usual job-control and termination
 * signals on to it, reaps every orphan that the namespace re-parents to it, and exits with the
 * command's status (128+N when the command was killed by signal N).  It is an ordinary small
 * process, so hpccr checkpoints and restores it with the rest of the job. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    sigset_t all;
    pid_t job;
    int status = 0;

    if (argc < 2) {
        fprintf(stderr, "usage: hpccr-init COMMAND [ARG...]\n");
        return 2;
    }
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, NULL);
    job = fork();
    if (job < 0) {
        perror("hpccr-init: fork");
        return 127;
    }
    if (job == 0) {
        sigprocmask(SIG_UNBLOCK, &all, NULL);
        execvp(argv[1], argv + 1);
        fprintf(stderr, "hpccr-init: %s: %s\n", argv[1], strerror(errno));
        _exit(127);
    }
    for (;;) {
        siginfo_t info;
        int sig = sigwaitinfo(&all, &info);

        if (sig < 0)
            continue; /* EINTR, e.g. after a checkpoint stopped us */
        if (sig != SIGCHLD) {
            kill(job, sig);
            continue;
        }
        for (;;) {
            int st;
            pid_t done = waitpid(-1, &st, WNOHANG);

            if (done <= 0)
                break;
            if (done == job) {
                status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
                return status;
            }
        }
    }
}
