"""Pausing Python's cyclic garbage collector around bulk work.

An import or a batch builds many objects that live until it ends and hold no reference
cycles (cells, legs, events, postings, the book and its movements): the collector would
walk the growing heap again and again and free nothing (measured: about half an import's
Python time on a large trades file, 28 s of a 100 s end of day). Reference counting still
frees every object as usual.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused(collect_after: bool = False) -> Iterator[None]:
    """The collector off for the block (unless it was off already), and with
    `collect_after` one full collection at its end."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
        if collect_after:
            gc.collect()
