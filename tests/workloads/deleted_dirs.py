"""Working in directories removed meanwhile (`rm -r` of a run directory): its working
directory and a descriptor of another directory, both deleted, must come back deleted and empty.

usage: deleted_dirs.py DIR

Enters DIR/run, opens DIR/data as a directory, removes both, prints READY, then waits until
DIR/go exists (the test makes it once the checkpoint is restored) and checks that both are
still directories without links, empty, and that nothing can be created in either; PASS, or
FAIL and why.  PID lines show its pid before and after.
"""

import errno
import os
import sys
import time


def failure(fd: int, what: str) -> str | None:
    st = os.fstat(fd)
    if st.st_nlink != 0:
        return f"{what} has {st.st_nlink} links"
    if os.listdir(fd):
        return f"{what} is not empty"
    try:
        os.close(os.open("new", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
    except OSError as exc:
        return None if exc.errno == errno.ENOENT else f"creating in {what}: {exc}"
    return f"a file could be created in {what}"


def main() -> int:
    top = sys.argv[1]
    run, data = os.path.join(top, "run"), os.path.join(top, "data")
    os.mkdir(run)
    os.mkdir(data)
    os.chdir(run)
    held = os.open(data, os.O_RDONLY | os.O_DIRECTORY)
    os.rmdir(run)
    os.rmdir(data)
    print(f"PID {os.getpid()}\nREADY", flush=True)
    while not os.path.exists(os.path.join(top, "go")):
        time.sleep(0.01)
    cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    why = failure(cwd, "the working directory") or failure(held, "the directory held open")
    print(f"PID {os.getpid()}\n" + (f"FAIL {why}" if why else "PASS"), flush=True)
    return 1 if why else 0


sys.exit(main())
