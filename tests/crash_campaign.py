"""Kill ``engine train`` with SIGKILL at random moments, many times, and print what happened.

    PYTHONPATH=. python tests/crash_campaign.py --kills 100 [--seed 0] [--hdf5] [--keep DIR]

Each run resumes with ``--snapshot latest``; after every kill each snapshot file written since
the last resume is checked (a solverstate with its model and checksums, a model parsed in full)
and the newest pair must load. At the end one more resume trains a few iterations past the last
snapshot, and the weights must equal, bit for bit, those of a run that was never killed. Exits
non-zero on any problem. tests/test_crash_safety.py runs the same with 10 kills.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import crash_harness


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hdf5", action="store_true", help="snapshot_format: HDF5")
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temp one)")
    args = parser.parse_args(argv)
    folder = Path(args.keep or tempfile.mkdtemp(prefix="moka-crash-"))
    folder.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    try:
        crash_harness.write_run(folder, max_iter=100_000_000, hdf5=args.hdf5)
        campaign = crash_harness.kill_campaign(folder, args.kills, seed=args.seed)
        print(campaign.summary())
        problems = list(campaign.problems)
        max_iter, final_problems = crash_harness.finish_and_compare(folder, hdf5=args.hdf5)
        problems += final_problems
        print(f"final resume to iteration {max_iter}: "
              f"{'bit-identical to an uninterrupted run' if not final_problems else 'DIFFERS'}")
        for problem in problems:
            print("PROBLEM:", problem)
        print(f"{len(problems)} problems; {time.monotonic() - start:.1f} s")
        return 1 if problems else 0
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
