"""A bound on how many images the service holds decoded at once.

A small PNG can decode to tens of megabytes, and uvicorn runs each request on one of about 40 threads: with
no bound, a burst of uploads from anyone who may search multiplies that by 40. A request takes a slot
before decoding and keeps it until it no longer needs the pixels (the search or add that embeds them);
a request that waits too long for a slot gets 503 with Retry-After, not an unbounded queue.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from xbt.errors import XbtError


class ServiceBusy(XbtError):
    """Every decode slot stayed taken for the whole wait: the client should retry shortly."""


class DecodeSlots:
    def __init__(self, slots: int, wait_s: float = 60.0):
        if slots < 1:
            raise ValueError("need at least one decode slot")
        self.slots, self.wait_s = slots, wait_s
        self._semaphore = threading.BoundedSemaphore(slots)

    @contextmanager
    def slot(self) -> Iterator[None]:
        if not self._semaphore.acquire(timeout=self.wait_s):
            raise ServiceBusy(f"the server is decoding {self.slots} images already and none finished within "
                              f"{self.wait_s:g} s; retry shortly")
        try:
            yield
        finally:
            self._semaphore.release()


def release_large_buffers_at_once(threshold_bytes: int = 1 << 20) -> bool:
    """Have glibc's malloc serve every allocation of `threshold_bytes` or more with its own mmap, returned to the
    system when freed. Decoded pixels are allocated in blocks of megabytes from whichever of the server's
    threads decodes them; in glibc's default mode those blocks stay in per-thread heaps after they are freed, so
    the resident memory keeps the high-water mark of every thread at once (bench/service_memory.py, 32 concurrent
    16 MP uploads, 4 decode slots: a peak of 2,645 MB without this, 1,313 MB with it; idle 953 MB). Returns False
    where malloc is not glibc's."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    m_mmap_threshold = -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, threshold_bytes))
