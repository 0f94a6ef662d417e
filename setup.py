"""Build the native parts: the cffi extension and the static restore stub."""

import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

NATIVE = Path("hpccr/native")


class BuildWithStub(build_py):
    """Compile hpccr-stub (no libc, static) next to the package sources before copying them."""

    def run(self):
        subprocess.check_call(
            ["gcc", "-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none",
             "-o", str(NATIVE / "hpccr-stub"), str(NATIVE / "stub.S")]
        )
        super().run()


setup(
    cffi_modules=["hpccr/native/build_ffi.py:ffibuilder"],
    cmdclass={"build_py": BuildWithStub},
)
