"""A fleet's matrix built one cell after another (each cell's `edgekit build` command line, as fleet.json lists it)
against `edgekit fleet` on a local Ray, on this machine, each from an empty cache and output folder.

Printed: both wall times and their ratio; Ray's start and stop alone (`ray.init` + `ray.shutdown` with the fleet's
settings); the build seconds summed inside Ray's workers; and the scheduling overhead per cell, what is left of the
fleet's wall time after Ray's start and stop and the builds spread over the cells that ran at once.

    .venv/bin/python bench/fleet.py [--matrix bench/fleet_matrix.toml] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EDGEKIT = str(Path(sys.executable).with_name("edgekit"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--matrix", type=Path, default=HERE / "fleet_matrix.toml")
    parser.add_argument("--work", type=Path, help="folder for both runs (default: a new temporary one)")
    args = parser.parse_args()
    work = (args.work or Path(tempfile.mkdtemp(prefix="edgekit-fleet-bench-"))).absolute()
    matrix = args.matrix.absolute()

    from edgekit.fleet import read_matrix

    cells = read_matrix(matrix, work / "sequential")
    print(f"{len(cells)} cells from {matrix}; {os.cpu_count()} CPUs", flush=True)
    start = time.monotonic()
    alone = []
    for cell in cells:  # the command line fleet.json gives to rerun a cell alone, with its --out in work/sequential
        began = time.monotonic()
        run = subprocess.run([EDGEKIT, *shlex.split(cell.command)[1:]], env={**os.environ,
                             "EDGEKIT_CACHE": str(work / "cache-sequential")}, capture_output=True, text=True,
                             check=False, cwd=Path.cwd())
        alone.append(time.monotonic() - began)
        print(f"  {cell.name}: exit {run.returncode}, {alone[-1]:.0f} s", flush=True)
    sequential = time.monotonic() - start

    started = time.monotonic()
    fleet = subprocess.run([EDGEKIT, "fleet", str(matrix), "--out", str(work / "ray"), "--cache",
                            str(work / "cache-ray"), "--json"], capture_output=True, text=True, check=False)
    on_ray = time.monotonic() - started
    summary = json.loads(fleet.stdout)
    ray_start = _ray_start_stop()
    built = sum(cell["seconds"] for cell in summary["cells"])
    at_once = min(len(cells), os.cpu_count() or 1)  # image cells ask for one CPU each
    overhead = (on_ray - ray_start - built / at_once) / len(cells)
    print(f"\n| run | wall s |\n|---|---|\n| one after another | {sequential:.0f} |\n| edgekit fleet, local Ray | "
          f"{on_ray:.0f} |")
    print(f"\nratio sequential / Ray: {sequential / on_ray:.2f}; Ray start + stop alone {ray_start:.1f} s; builds "
          f"inside Ray's workers {built:.0f} s in all ({at_once} at once); scheduling overhead about {overhead:.1f} s "
          f"per cell; fleet exit {summary['exit_code']}")


def _ray_start_stop() -> float:
    """Seconds for a local Ray as `edgekit fleet` starts and stops it, in a fresh process."""
    code = ("import os, time; import ray; from edgekit.fleet import OBJECT_STORE_BYTES, start_local_ray; "
            "t = time.monotonic(); start_local_ray(os.cpu_count() or 1, OBJECT_STORE_BYTES); ray.shutdown(); "
            "print(time.monotonic() - t)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(run.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
