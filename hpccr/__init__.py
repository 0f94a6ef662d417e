"""hpccr: transparent checkpoint/restart of HPC jobs from user space."""

__version__ = "0.1.0"
