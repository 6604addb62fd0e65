"""The scale-up backend: every rank maps every other rank's memory (NVLink on GPUs, POSIX shared
memory on CPUs) and the Triton kernels move rows by loads and stores. ``core`` holds the heap and
the protocol; each operation has a module of its own (``dispatch``, ``combine``)."""
from .core import SymmetricBackend

__all__ = ["SymmetricBackend"]
