"""`python -m tests.simulation`: run simulation seeds from the command line.

    python -m tests.simulation --seed 7 --steps 2000 --backend sqlite
    python -m tests.simulation --seed 7 --steps 812 --stop-at 811 --keep   # inspect step 811
    python -m tests.simulation --seeds 0-999 --steps 2000 --backend sqlite --workers 2

A failure prints the seed, the step, what the step did and the command that replays it; the
run is deterministic, so the same command meets the same failure. `--stop-at STEP` runs (and
checks) the steps before STEP, then prints STEP and where its file is, and with `--keep`
leaves the database and the files in place, so the step can be run by hand
(`clearing import KIND FILE --db URL`). Exit code 1 when any seed failed.

PostgreSQL comes from CLEARING_TEST_POSTGRES_URL, as for the tests; each seed gets its own
schema, dropped afterwards unless `--keep`.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context

from tests.simulation.runner import VERIFY_EVERY, run_seed, SeedResult


def _seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        seeds.extend(range(int(low), int(high or low) + 1))
    return seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.simulation",
                                     description="Deterministic simulation of the ledger.")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--seed", type=int, help="one seed")
    which.add_argument("--seeds", type=_seeds, help="seeds, e.g. 0-999 or 1,5,9-12")
    parser.add_argument("--steps", type=int, default=2000, help="steps per seed (2000)")
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                        help="run the steps before STEP, then show STEP and stop")
    parser.add_argument("--verify-every", type=int, default=VERIFY_EVERY, metavar="K",
                        help=f"steps between full `clearing verify` runs ({VERIFY_EVERY})")
    parser.add_argument("--workers", type=int, default=1,
                        help="seeds run at once, each in its own process (1)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the database and files (printed) instead of removing them")
    args = parser.parse_args(argv)
    seeds = [args.seed] if args.seed is not None else args.seeds
    started = time.perf_counter()
    failures: list[SeedResult] = []
    done = 0
    steps = 0

    def report(result: SeedResult) -> None:
        nonlocal done, steps
        done += 1
        steps += result.steps
        if result.failure:
            failures.append(result)
            print(result.failure, flush=True)
        else:
            print(result.summary, flush=True)
        if result.next_step:
            print(f"stopped before {result.next_step}")
        if result.kept:
            print(result.kept)
        if len(seeds) > 1:
            elapsed = time.perf_counter() - started
            print(f"  [{done}/{len(seeds)} seeds, {len(failures)} failed, "
                  f"{1000 * elapsed / max(steps, 1):.1f} ms per step overall]", flush=True)

    arguments = [(seed, args.backend, args.steps, args.stop_at, args.verify_every, args.keep)
                 for seed in seeds]
    if args.workers <= 1:
        for item in arguments:
            report(run_seed(*item))
    else:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
            for future in as_completed([pool.submit(run_seed, *item) for item in arguments]):
                report(future.result())
    elapsed = time.perf_counter() - started
    print(f"{len(seeds)} seeds x {args.steps} steps on {args.backend}: "
          f"{len(failures)} failed in {elapsed:.0f} s "
          f"({1000 * elapsed / max(steps, 1):.1f} ms per step overall)")
    if failures:
        print("failed seeds: " + " ".join(str(f.seed) for f in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
