"""Files without a name and descriptors without an offset: what tmpfile(3) makes (O_TMPFILE |
O_EXCL, never to be named), an O_TMPFILE file that may still be given a name (linkat: how
files are written atomically), and O_PATH descriptors of a directory and of a deleted file.

usage: unnamed_files.py DIR

Makes them in DIR, prints READY, waits until DIR/go exists (the test makes it once the
checkpoint is restored), then checks: both unnamed files still hold their data at their
offsets, the second can be named DIR/named (and that name holds its data), and the O_PATH
descriptors still lead to their directory and (deleted) file; PASS, or FAIL and why.  PID
lines show its pid before and after.
"""

import os
import sys
import time


def name(fd: int, path: str) -> None:
    """linkat(AT_FDCWD, /proc/self/fd/FD, …, AT_SYMLINK_FOLLOW): with a directory descriptor
    given, os.link calls linkat, not link (which would not follow the magic link)."""
    root = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.link(f"/proc/self/fd/{fd}", path, src_dir_fd=root, follow_symlinks=True)
    finally:
        os.close(root)


def check(top: str, scratch: int, linkable: int, directory: int, gone: int) -> str | None:
    if os.pread(scratch, 100, 0) != b"scratch data" or os.lseek(scratch, 0, os.SEEK_CUR) != 7:
        return "the tmpfile(3) file lost its data or offset"
    if os.pread(linkable, 100, 0) != b"to be named" or os.lseek(linkable, 0, os.SEEK_CUR) != 11:
        return "the linkable file lost its data or offset"
    name(linkable, os.path.join(top, "named"))
    with open(os.path.join(top, "named"), "rb") as named:
        if named.read() != b"to be named":
            return "the file named at last holds other data"
    if os.listdir(os.open(".", os.O_RDONLY, dir_fd=directory)) != ["inside"]:
        return "the O_PATH directory descriptor leads elsewhere"
    st = os.stat(f"/proc/self/fd/{gone}")
    if st.st_nlink != 0 or st.st_size != 4:
        return "the O_PATH descriptor of a deleted file leads elsewhere"
    return None


def main() -> int:
    top = sys.argv[1]
    scratch = os.open(top, os.O_TMPFILE | os.O_EXCL | os.O_RDWR, 0o600)
    os.write(scratch, b"scratch data")
    os.lseek(scratch, 7, os.SEEK_SET)
    linkable = os.open(top, os.O_TMPFILE | os.O_RDWR, 0o600)
    os.write(linkable, b"to be named")
    os.makedirs(os.path.join(top, "dir", "inside"))
    directory = os.open(os.path.join(top, "dir"), os.O_PATH | os.O_DIRECTORY)
    with open(os.path.join(top, "gone"), "w") as f:
        f.write("gone")
    gone = os.open(os.path.join(top, "gone"), os.O_PATH)
    os.unlink(os.path.join(top, "gone"))
    print(f"PID {os.getpid()}\nREADY", flush=True)
    while not os.path.exists(os.path.join(top, "go")):
        time.sleep(0.01)
    why = check(top, scratch, linkable, directory, gone)
    print(f"PID {os.getpid()}\n" + (f"FAIL {why}" if why else "PASS"), flush=True)
    return 1 if why else 0


sys.exit(main())
