"""Build the native parts: the cffi extension and the static restore stub."""

import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

NATIVE = Path("hpccr/native")
SLURM = Path("hpccr/slurm")
SPANK_HEADER = Path("/usr/include/slurm/spank.h")


class BuildWithStub(build_py):
    """Compile the two helper programs next to the package sources before copying them:
    hpccr-stub (static, no libc) and hpccr-init (pid 1 of jobs started by `hpccr run`);
    and the Slurm SPANK plugin spank_hpccr.so when Slurm's headers are installed."""

    def run(self):
        subprocess.check_call(
            ["gcc", "-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none",
             "-o", str(NATIVE / "hpccr-stub"), str(NATIVE / "stub.S")]
        )
        subprocess.check_call(
            ["gcc", "-O2", "-Wall", "-o", str(NATIVE / "hpccr-init"), str(NATIVE / "init.c")]
        )
        if SPANK_HEADER.exists():
            subprocess.check_call(
                ["gcc", "-shared", "-fPIC", "-O2", "-Wall",
                 "-o", str(SLURM / "spank_hpccr.so"), str(SLURM / "spank_hpccr.c")]
            )
        else:
            print(f"{SPANK_HEADER} not found (Debian: libslurm-dev): SPANK plugin not built")
        super().run()


setup(
    cffi_modules=["hpccr/native/build_ffi.py:ffibuilder"],
    cmdclass={"build_py": BuildWithStub},
)
