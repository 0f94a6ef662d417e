"""Files: descriptors come back with their file, access mode, offset, O_APPEND, close-on-exec
and sharing; a deleted-but-open file comes back with its content; cwd, umask and RLIMIT_NOFILE
are kept.

Workloads: workloads/files.c DIR (works in DIR, checks everything itself after the window),
deleted_dirs.py DIR (its working directory and a directory it holds open, both removed),
unnamed_files.py DIR (O_TMPFILE files and O_PATH descriptors), many_fds.py DIR (1500 descriptions
of /dev/null and 500 dups).
"""


def test_files_without_checkpoint(cr, tmp_path):
    workload = cr.start("files", tmp_path)
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()


def test_files(cr, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    workload = cr.start("files", workdir)
    img = tmp_path / "img"
    cr.dump_and_kill(workload, img)
    assert not (workdir / "ghost.dat").exists()
    cr.restore_and_pass(workload, img)
    assert not (workdir / "ghost.dat").exists()


def test_missing_file_at_restore(cr, tmp_path):
    """A file the process had open is gone: the restore refuses (17) and names it; put back,
    the same image restores."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    workload = cr.start("files", workdir)
    img = tmp_path / "img"
    cr.dump_and_kill(workload, img)
    ro = workdir / "ro.dat"
    content = ro.read_bytes()
    ro.unlink()
    message = cr.assert_error(cr.restore(img), 17)
    assert "ro.dat" in message
    assert not workload.alive()
    ro.write_bytes(content)
    cr.restore_and_pass(workload, img)


def test_sparse_files(cr, tmp_path):
    """A sparse deleted file of another owner and a sparse memfd (3 GiB each, 192 KiB of data):
    the image holds their data only, and they come back with the same data and holes, still
    sparse; the deleted file with its owner (a root image)."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    workload = cr.start("ghost_sparse", workdir)
    img = tmp_path / "img"
    cr.dump_and_kill(workload, img)
    saved = sum(f.stat().st_size for f in img.glob("ghost-*"))
    assert saved < 1 << 20, f"{saved} bytes saved for 384 KiB of data"
    cr.restore_and_pass(workload, img)


def passes_with_and_without_a_checkpoint(cr, tmp_path, workload: str) -> None:
    """`workload` DIR, which checks itself once DIR/go exists: run through (the control), then
    dumped (killed), told to go and restored; it passes both times."""
    for checkpointed in (False, True):
        top = tmp_path / f"top-{checkpointed}"
        top.mkdir()
        started = cr.start(workload, top)
        if checkpointed:
            cr.dump_and_kill(started, tmp_path / "img")
            (top / "go").touch()
            cr.restore_and_pass(started, tmp_path / "img")
        else:
            (top / "go").touch()
            assert started.wait_exit() == 0, started.output()


def test_directories_deleted_while_in_use(cr, tmp_path):
    """The working directory and a directory held open, both removed while the process runs
    (`rm -r` of its run directory; workloads/deleted_dirs.py): restored, both are empty deleted
    directories again, in which nothing can be created, as before the checkpoint — the workload
    checks it itself (control: it passes without a checkpoint)."""
    passes_with_and_without_a_checkpoint(cr, tmp_path, "deleted_dirs.py")


def test_unnamed_files_and_path_descriptors(cr, tmp_path):
    """What tmpfile(3) makes (O_TMPFILE | O_EXCL), an O_TMPFILE file that may still be given a
    name, and O_PATH descriptors of a directory and of a deleted file (workloads/
    unnamed_files.py): restored, the unnamed files hold their data at their offsets, the second
    can still be named in its directory, and the O_PATH descriptors lead where they did — the
    workload checks it itself (control: it passes without a checkpoint)."""
    passes_with_and_without_a_checkpoint(cr, tmp_path, "unnamed_files.py")


def test_thousands_of_descriptors_on_one_inode(cr, tmp_path):
    """1500 opens of /dev/null and 500 dups of them (workloads/many_fds.py): the dump tells
    the descriptions apart (kcmp, by binary search in its order) and the restored process
    still has 1500 descriptions, each dup one with its original — it checks this itself
    (control: it passes without a checkpoint)."""
    passes_with_and_without_a_checkpoint(cr, tmp_path, "many_fds.py")
