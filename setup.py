"""Build the native parts: the cffi extension and the static restore stub."""

import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

NATIVE = Path("hpccr/native")


class BuildWithStub(build_py):
    """Compile the two helper programs next to the package sources before copying them:
    hpccr-stub (static, no libc) and hpccr-init (pid 1 of jobs started by `hpccr run`)."""

    def run(self):
        subprocess.check_call(
            ["gcc", "-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none",
             "-o", str(NATIVE / "hpccr-stub"), str(NATIVE / "stub.S")]
        )
        subprocess.check_call(
            ["gcc", "-O2", "-Wall", "-o", str(NATIVE / "hpccr-init"), str(NATIVE / "init.c")]
        )
        super().run()


setup(
    cffi_modules=["hpccr/native/build_ffi.py:ffibuilder"],
    cmdclass={"build_py": BuildWithStub},
)
