"""Handing freed memory back to the operating system between the stages of a long run."""

from __future__ import annotations


def release_memory():
    """Collect, then hand freed heap pages back to the OS (glibc's malloc_trim). Without it a process
    that built and dropped large tensors or sessions (a training run, an export, an inference session)
    keeps their pages in its resident set for its lifetime, and the next stage's peak adds on top."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the memory is reused by the process, not returned
        pass

