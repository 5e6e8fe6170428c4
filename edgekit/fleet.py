"""`edgekit fleet`: a matrix of builds (models × targets × precisions, recipes, budgets) run on Ray, one build per
task, each cell exactly one `edgekit build` command line.

The cells are parsed by the build command's own parser before anything runs, so a bad matrix fails at once and
every cell's command line can be run alone. Ray starts in this process (this machine's cores, a small object
store, no dashboard) unless `address` names a cluster. Each task declares the CPUs and memory its family needs and
builds into its own folder under `out` with the fleet's cache (on a cluster both must be on storage the nodes
share); a worker that dies is retried by Ray, and a cell whose finished folder matches its inputs is kept, not
rebuilt (`build(..., reuse=True)`), so a killed fleet, rerun, finishes only what is missing. A failed cell is a row
of the summary, never the end of the fleet.
"""

from __future__ import annotations

import contextlib
import html
import itertools
import logging
import os
import re
import shlex
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.cache import default_cache_dir
from edgekit.errors import UsageError, first_line
from edgekit.report.write import write_json

GIB = 2**30
# (CPUs, memory) one build asks Ray for, by family: a language model's GPTQ and a segmenter's slimming take more
NEEDS: dict[str, tuple[float, int]] = {"llm": (2, 8 * GIB), "segmenter": (2, 16 * GIB)}
IMAGE_NEEDS = (1.0, 3 * GIB)
RETRIES = 3  # times Ray reruns a cell whose worker process died
OBJECT_STORE_BYTES = 300 * 2**20  # a local Ray's object store: reports travel through it, artifacts do not
FLEET_FLAGS = {"out", "json", "quiet"}  # the fleet decides these for every cell


@dataclass(frozen=True)
class Cell:
    name: str
    argv: list[str]  # the `edgekit build` arguments, --out included
    cpus: float
    memory: int  # bytes

    @property
    def command(self) -> str:
        return shlex.join(["edgekit", "build", *self.argv])


def read_matrix(path: Path, out: Path) -> list[Cell]:
    """The cells of a matrix file: each `[[models]]` entry times every combination of the `[matrix]` lists, with the
    `[build]` flags (a model's own flags win over them). Keys are `edgekit build`'s long flag names; values are as
    typed on the command line (paths relative to where the fleet runs)."""
    from edgekit.cli import parse_build

    try:
        spec = tomllib.loads(path.read_text())
    except OSError as err:
        raise UsageError(f"{path}: {err.strerror or err}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path} is not TOML ({first_line(err)})") from None
    unknown = set(spec) - {"build", "models", "matrix"}
    if unknown:
        raise UsageError(f"{path}: unknown table {sorted(unknown)[0]!r} (a matrix has [build], [[models]], [matrix])")
    common, models, axes = spec.get("build", {}), spec.get("models"), spec.get("matrix", {})
    if not isinstance(models, list) or not models or not all(
            isinstance(m, dict) and isinstance(m.get("model"), str) for m in models):
        raise UsageError(f"{path}: [[models]] must list at least one model, each with `model = \"...\"`")
    if not isinstance(common, dict) or not isinstance(axes, dict):
        raise UsageError(f"{path}: [build] and [matrix] must be tables")
    for key, values in axes.items():
        if not isinstance(values, list) or not values or any(isinstance(v, (list, dict)) for v in values):
            raise UsageError(f"{path}: [matrix] {key} must be a non-empty list of values")
    cells: dict[str, Cell] = {}
    for entry in models:
        flags = {key: value for key, value in entry.items() if key not in ("model", "name")}
        clash = sorted(axes.keys() & flags.keys())
        if clash:
            raise UsageError(f"{path}: {clash[0]} is both a [matrix] axis and a flag of model {entry['model']}")
        for combination in itertools.product(*axes.values()):
            chosen = dict(zip(axes, combination, strict=True))
            name = "-".join(_slug(str(part)) for part in (entry.get("name") or Path(entry["model"]).stem,
                                                           *combination))
            if name in cells:
                raise UsageError(f"{path}: two cells are both named {name}; give the models distinct `name`s")
            argv = [str(entry["model"]), *_flags(path, {**common, **flags, **chosen}), "--out", str(out / name)]
            try:
                args = parse_build(argv)
            except UsageError as err:
                raise UsageError(f"{path}: cell {name}: {err}") from None
            cells[name] = Cell(name, argv, *_needs(args))
    return list(cells.values())


def _flags(path: Path, values: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for key, value in values.items():
        flag = key.replace("_", "-")
        if flag in FLEET_FLAGS:
            raise UsageError(f"{path}: {key} is the fleet's to set (`edgekit fleet --out` names the cells' folder)")
        if isinstance(value, (list, dict)):
            raise UsageError(f"{path}: {key} holds a list or table; lists of values go in [matrix]")
        if value is not False:
            argv += [f"--{flag}"] if value is True else [f"--{flag}", str(value)]
    return argv


def _slug(text: str) -> str:
    """A folder-name form of a model or axis value: a path by its stem, `size=4MB` as `size_4MB`."""
    part = Path(text).stem if "/" in text or text.endswith(".toml") else text
    return re.sub(r"[^A-Za-z0-9.+_-]+", "_", part).strip("_") or "_"


def _needs(args: Any) -> tuple[float, int]:
    """What one build of this cell asks Ray for, by its model's family (a model that is not found: an image build's,
    and the build reports it)."""
    from edgekit import families
    from edgekit.families.base import LoadOptions

    try:
        family = families.resolve(args.model, LoadOptions(args.arch, args.num_classes, args.input_size)).name
    except UsageError:
        return IMAGE_NEEDS
    return NEEDS.get(family, IMAGE_NEEDS)


def build_cell(argv: list[str], cwd: str, cache: str) -> dict[str, Any]:
    """One cell, in a Ray worker: `edgekit build ARGV` from the fleet's working folder with the fleet's cache. Never
    raises: the outcome, a failure included, is the cell's row."""
    from edgekit.api import build
    from edgekit.cli import build_arguments, failure, gate_failures, parse_build

    os.chdir(cwd)
    os.environ["EDGEKIT_CACHE"] = cache
    start = time.monotonic()
    try:
        result = build(**{**build_arguments(parse_build(argv)), "quiet": True}, reuse=True)
    except Exception as err:
        code, reason = failure(err)
        return {"exit_code": code, "reason": reason, "seconds": time.monotonic() - start}
    return {"exit_code": result.exit_code, "reason": gate_failures(result.failed_gates) or None,
            "report": result.report, "kept": result.kept, "seconds": time.monotonic() - start}


def run(matrix: str | Path, *, out: str | Path = "dist/fleet", address: str | None = None,
        cache: str | Path | None = None, quiet: bool = False) -> dict[str, Any]:
    """Build every cell of `matrix` on Ray (a local one started and stopped here, the cluster at `address`, or the
    caller's where it has called `ray.init`); write `out`/fleet.json and `out`/index.html. Returns the summary: each
    cell's row, and the exit code (the highest of the cells': 0 all verified, 1 a gate failed, 2 bad input, 3 a stage
    failed)."""
    import ray

    out = Path(out)
    cells = read_matrix(Path(matrix), out)
    out.mkdir(parents=True, exist_ok=True)  # here, not by the first cell's build: a failed build removes what it made
    cache_dir = str(Path(cache or default_cache_dir()).absolute())
    start = time.monotonic()
    started = not ray.is_initialized()  # a caller that connected to Ray itself keeps its connection
    # Ray prints the cluster's error reports (a worker killed for memory: 60 lines each) to the driver's stdout,
    # whatever log_to_driver says: they go to OUT/ray.log, keeping stdout for the summary (and --json)
    with open(out / "ray.log", "a") as log, contextlib.redirect_stdout(log):
        if started and address:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        elif started:
            start_local_ray(os.cpu_count() or 1, OBJECT_STORE_BYTES)
        try:
            outcomes = _run_cells(cells, cache_dir, quiet)
        finally:
            if started:
                ray.shutdown()
    rows = [_row(cell, outcomes[cell.name], out) for cell in cells]
    summary = {"matrix": str(matrix), "out": str(out), "ray": address or ("local" if started else "the caller's"),
               "seconds": round(time.monotonic() - start, 1),
               "exit_code": max(row["exit_code"] for row in rows), "cells": rows}
    write_json(out / "fleet.json", summary)
    (out / "index.html").write_text(index_html(summary), encoding="utf-8")
    return summary


def start_local_ray(cpus: int, object_store_bytes: int) -> None:
    """A local Ray for the fleet: no dashboard, workers' logs kept out of the terminal, and workers at the driver's
    priority (Ray's default niceness of 15 starves builds whenever anything else shares the cores: a MobileNetV2
    build took 12 times as long beside two other jobs)."""
    import ray

    ray.init(num_cpus=cpus, object_store_memory=object_store_bytes, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, _system_config={"worker_niceness": 0})


def _run_cells(cells: list[Cell], cache_dir: str, quiet: bool) -> dict[str, dict[str, Any]]:
    """Every cell as one Ray task, its needs capped by the cluster's size; each outcome by cell name."""
    import ray

    total = ray.cluster_resources()
    task = ray.remote(max_retries=RETRIES)(build_cell)
    pending = {task.options(num_cpus=min(cell.cpus, total.get("CPU", 1)),
                            memory=min(cell.memory, int(total.get("memory", cell.memory)))
                            ).remote(cell.argv, os.getcwd(), cache_dir): cell for cell in cells}
    outcomes: dict[str, dict[str, Any]] = {}
    while pending:
        [ready], _ = ray.wait(list(pending), num_returns=1)
        cell = pending.pop(ready)
        try:
            outcomes[cell.name] = ray.get(ready)
        except ray.exceptions.RayError as err:  # its worker died more often than Ray retries
            outcomes[cell.name] = {"exit_code": 3, "reason": f"Ray: {first_line(err)}"}
        if not quiet:
            print(f"[{len(outcomes)}/{len(cells)}] {cell.name}: {_status(outcomes[cell.name])}", file=sys.stderr,
                  flush=True)
    return outcomes


def _status(outcome: dict[str, Any]) -> str:
    code = outcome["exit_code"]
    status = {0: "ok", 1: "gate failed", 2: "bad input"}.get(code, "stage failed")
    return status + (" (kept)" if outcome.get("kept") else "")


def _row(cell: Cell, outcome: dict[str, Any], out: Path) -> dict[str, Any]:
    """A cell's line of the summary: the figures from its report (none for a cell that did not build)."""
    from edgekit.cli import latency_texts

    report = outcome.get("report")
    row: dict[str, Any] = {"cell": cell.name, "status": _status(outcome), "exit_code": outcome["exit_code"],
                           "reason": outcome.get("reason"), "kept": bool(outcome.get("kept")),
                           "seconds": round(outcome.get("seconds", 0.0), 1), "folder": str(out / cell.name),
                           "command": cell.command}
    if report:
        measured, estimated = latency_texts(report)
        row |= {"artifact": report["artifact"]["file"], "precision": report["artifact"]["precision"],
                "headline": report["accuracy"]["summary"], "size_bytes": report["size_bytes"],
                "estimated": f"{report['target']['name']} {estimated}", "measured_host": measured}
    return row


COLUMNS = [("cell", "cell"), ("status", "status"), ("headline", "headline metric"), ("size", "size"),
           ("estimated", "estimated latency"), ("measured_host", "measured: host")]


def table_rows(summary: dict[str, Any]) -> list[list[str]]:
    """The summary's table as text cells, in COLUMNS' order (the terminal's and index.html's)."""
    return [[row["cell"], row["status"], row.get("headline", "-"),
             f"{row['size_bytes'] / 1e6:.2f} MB" if "size_bytes" in row else "-", row.get("estimated", "-"),
             row.get("measured_host", "-")] for row in summary["cells"]]


def index_html(summary: dict[str, Any]) -> str:
    """index.html: the summary table, each cell linking to its report.html (or its folder, where it did not build)."""
    lines = []
    for row, texts in zip(summary["cells"], table_rows(summary), strict=True):
        link = f"{row['cell']}/report.html" if "headline" in row else f"{row['cell']}/"
        cells = [f'<a href="{html.escape(link)}">{html.escape(texts[0])}</a>', *map(html.escape, texts[1:])]
        reason = f'<div class="reason">{html.escape(row["reason"])}</div>' if row["reason"] else ""
        lines.append(f'<tr class="{"ok" if row["exit_code"] == 0 else "failed"}"><td>{cells[0]}</td><td>{cells[1]}'
                     f'{reason}</td>' + "".join(f"<td>{text}</td>" for text in cells[2:]) +
                     f"<td><code>{html.escape(row['command'])}</code></td></tr>")
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in COLUMNS) + "<th>command</th>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>edgekit fleet: {html.escape(summary['matrix'])}</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border-bottom:1px solid #ddd;padding:4px 10px;text-align:left;vertical-align:top}}
tr.failed td:nth-child(2){{color:#b00020}}.reason{{font-size:12px;max-width:40em}}code{{font-size:12px}}</style>
</head><body>
<h1>edgekit fleet</h1>
<p>{html.escape(summary['matrix'])}: {len(summary['cells'])} cells on Ray ({html.escape(summary['ray'])}) in
{summary['seconds']:.0f} s, exit code {summary['exit_code']}. Latency: <em>estimated</em> on the target by the
device model, <em>measured: host</em> on the machine that built the cell.</p>
<table><tr>{head}</tr>
{chr(10).join(lines)}
</table></body></html>
"""
