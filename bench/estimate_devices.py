"""The device model against every published latency, per target: estimate and published side by side.

    .venv/bin/python bench/estimate_devices.py [--targets coral-edgetpu jetson-agx-orin ...]

For each target with a `targets/measurements/<target>.csv`, every row's model is built with random weights at the
row's input size and precision (cached after the first run), estimated with the profile's numbers as they stand,
and with a fit made without that row's model (leave-one-model-out): how far the estimate is from the device, and how
well the fit predicts a model it has not seen. Nothing is written; `edgekit estimate --fit-published T --write` does
that. Latencies here are `estimated` (the device model) against `published` (measured on the device by the source).
"""

from __future__ import annotations

import argparse
import time

from edgekit.api import fit_published
from edgekit.resources import resource_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tables = sorted(p.stem for p in (resource_dir("targets") / "measurements").glob("*.csv"))
    parser.add_argument("--targets", nargs="+", choices=tables, default=tables)
    args = parser.parse_args()
    summary = []
    for name in args.targets:
        start = time.perf_counter()
        result = fit_published(name, quiet=True)
        print(f"\n{name} ({time.perf_counter() - start:.0f} s)")
        print(f"  {'model':<20} {'precision':<9} {'runtime':<11} {'input':>5} {'published ms':>12} "
              f"{'estimated ms':>12} {'ratio':>6} {'left out':>8}")
        for row in result["rows"]:
            left_out = "-" if row["held_out_ratio"] is None else f"{row['held_out_ratio']:.2f}x"
            print(f"  {row['model']:<20} {row['precision']:<9} {row['runtime']:<11} {row['input']:>5} "
                  f"{row['published_ms']:>12g} {row['before_ms']:>12.3f} "
                  f"{row['before_ms'] / row['published_ms']:>5.2f}x {left_out:>8}")
        summary.append((name, len(result["rows"]), len(result["models"]), result["median_error_before"],
                        result["held_out_median_error"]))
    print(f"\n{'target':<24} {'rows':>4} {'models':>6} {'median error':>12} {'left one model out':>18}")
    for name, rows, models, error, held_out in summary:
        left_out = "-" if held_out is None else f"{held_out * 100:.0f}%"
        print(f"{name:<24} {rows:>4} {models:>6} {error * 100:>11.0f}% {left_out:>18}")


if __name__ == "__main__":
    main()
