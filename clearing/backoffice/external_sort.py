"""Sorting more records than memory should hold: sorted runs on disk, then a k-way merge.

Records are tuples; a codec turns one into a line of text and back (no field may contain a
tab or a newline: the statement readers refuse control characters). At most `run_rows`
records are in memory while runs are written, and one record per open run while they are
merged; at most `fan_in` runs are merged at once (more are merged in rounds), so the number
of open files stays bounded too. Equal keys keep their input order (the sort and the merge
are both stable), so the first of two duplicates is the one that came first.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

RUN_ROWS = 50_000
"""Records sorted in memory at once (about 20 MB of short tuples)."""
FAN_IN = 64
"""Runs merged at once: files open at the same time."""

Record = tuple[Any, ...]


@dataclass(frozen=True)
class Codec:
    """One record as one line of text (without its newline), and back."""

    encode: Callable[[Record], str]
    decode: Callable[[str], Record]


class SortedRecords:
    """Records in key order, from memory (when they fit in one run) or from one file on disk;
    may be iterated any number of times."""

    def __init__(self, in_memory: Sequence[Record] | None, path: Path | None,
                 codec: Codec) -> None:
        self._in_memory = in_memory
        self._path = path
        self._codec = codec

    def __iter__(self) -> Iterator[Record]:
        if self._in_memory is not None:
            yield from self._in_memory
            return
        assert self._path is not None
        yield from _read_run(self._path, self._codec)


def sort_records(records: Iterable[Record], key: Callable[[Record], Any], codec: Codec,
                 workdir: Path, *, run_rows: int = RUN_ROWS,
                 fan_in: int = FAN_IN) -> SortedRecords:
    """`records` in `key` order, spilling to files under `workdir` beyond `run_rows`."""
    if run_rows < 1 or fan_in < 2:
        raise ValueError("run_rows must be >= 1 and fan_in >= 2")
    source = iter(records)
    runs: list[Path] = []
    while True:
        chunk = list(islice(source, run_rows))
        if not runs and len(chunk) < run_rows:
            chunk.sort(key=key)
            return SortedRecords(chunk, None, codec)
        if not chunk:
            break
        chunk.sort(key=key)
        runs.append(_write_run(workdir, len(runs), chunk, codec))
        del chunk
    generation = 0
    while len(runs) > 1:
        generation += 1
        merged: list[Path] = []
        for start in range(0, len(runs), fan_in):
            group = runs[start : start + fan_in]
            if len(group) == 1:
                merged.append(group[0])
                continue
            target = workdir / f"merge-{generation}-{start // fan_in}.run"
            _merge_runs(group, target, key, codec)
            for path in group:
                path.unlink()
            merged.append(target)
        runs = merged
    return SortedRecords(None, runs[0], codec)


def _write_run(workdir: Path, index: int, chunk: list[Record], codec: Codec) -> Path:
    path = workdir / f"run-{index}.run"
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        handle.writelines(codec.encode(r) + "\n" for r in chunk)
    return path


def _read_run(path: Path, codec: Codec) -> Iterator[Record]:
    decode = codec.decode
    with path.open("r", encoding="utf-8", newline="\n") as handle:
        for line in handle:
            yield decode(line[:-1])


def _merge_runs(paths: list[Path], target: Path, key: Callable[[Record], Any],
                codec: Codec) -> None:
    with ExitStack() as stack:
        # Each run's reader closes with the stack, even when the merge stops part-way.
        readers = [stack.enter_context(closing(_read_run(p, codec))) for p in paths]
        with target.open("w", encoding="utf-8", newline="\n") as out:
            encode = codec.encode
            out.writelines(encode(r) + "\n" for r in heapq.merge(*readers, key=key))

