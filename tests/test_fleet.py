"""`edgekit fleet` on a local Ray with a tiny ONNX classifier: the same bytes as single builds, a rerun rebuilds
nothing, a killed worker is retried, failed cells are reported while the rest finish, a bad matrix stops at once."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest
import torch

from edgekit import build
from edgekit.cli import main
from edgekit.data import file_sha256
from edgekit.fleet import start_local_ray
from edgekit.passes.export import export_onnx

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One small local Ray for the module (starting one takes seconds); the fleet uses it and leaves it running."""
    start_local_ray(2, 100 * 2**20)
    yield
    ray.shutdown()


@pytest.fixture
def tiny_onnx(tiny_model: torch.nn.Module, tmp_path: Path) -> Path:
    path = tmp_path / "tiny.onnx"
    onnx.save(export_onnx(tiny_model, (1, 3, 32, 32), 17), str(path))
    return path


def _matrix(path: Path, models: str, matrix: str) -> Path:
    path.write_text(f'[build]\ncalib = "photos"\nruns = 3\n\n{models}\n[matrix]\n{matrix}\n')
    return path


def _fleet(capsys: pytest.CaptureFixture[str], matrix: Path, *flags: str) -> tuple[int, dict]:
    code = main(["fleet", str(matrix), "--quiet", *flags])
    capsys.readouterr()
    return code, json.loads(Path("dist/fleet/fleet.json").read_text())


def _alone(command: str, out: str) -> Path:
    """A fleet cell's printed command line run alone, into another folder: the artifact it builds."""
    argv = shlex.split(command)[1:]
    argv[argv.index("--out") + 1] = out
    assert main([*argv, "--quiet"]) == 0
    return next(Path(out).glob("model.*"))


def test_fleet_builds_the_bytes_of_single_builds_and_a_rerun_keeps_them(
        local_ray: None, tiny_onnx: Path, photos: Path, capsys: pytest.CaptureFixture[str]) -> None:
    matrix = _matrix(Path("m.toml"), '[[models]]\nmodel = "tiny.onnx"\n',
                     'target = ["x86-64", "jetson"]\nprecision = ["fp32", "fp16"]')
    code, summary = _fleet(capsys, matrix)
    assert code == 0 and summary["exit_code"] == 0
    rows = {row["cell"]: row for row in summary["cells"]}
    assert sorted(rows) == ["tiny-jetson-fp16", "tiny-jetson-fp32", "tiny-x86-64-fp16", "tiny-x86-64-fp32"]
    assert all(row["status"] == "ok" and not row["kept"] for row in rows.values())
    for name in ("tiny-jetson-fp16", "tiny-x86-64-fp32"):
        folder = Path(rows[name]["folder"])
        report = json.loads((folder / "report.json").read_text())
        assert report["artifact"]["precision"] == name.rsplit("-", 1)[1]
        assert file_sha256(_alone(rows[name]["command"], f"alone/{name}")) == report["artifact"]["sha256"]
    index = Path("dist/fleet/index.html").read_text()
    assert all(f'href="{name}/report.html"' in index for name in rows)
    assert all((Path("dist/fleet") / name / "report.html").is_file() for name in rows)

    built = {name: (Path(row["folder"]) / "manifest.json").stat().st_mtime_ns for name, row in rows.items()}
    code, again = _fleet(capsys, matrix)
    assert code == 0 and all(row["kept"] and row["status"] == "ok (kept)" for row in again["cells"])
    assert {row["cell"]: (Path(row["folder"]) / "manifest.json").stat().st_mtime_ns for row in again["cells"]} == built


def test_a_finished_folder_is_kept_only_while_its_inputs_recipe_and_outputs_match(tiny_onnx: Path,
                                                                                   photos: Path) -> None:
    options = {"calib": photos, "out": "out", "quiet": True, "reuse": True}
    first = build(tiny_onnx, "x86-64", overrides={"verify.runs": 3}, **options)
    assert not first.kept
    assert build(tiny_onnx, "x86-64", overrides={"verify.runs": 3}, **options).kept
    assert not build(tiny_onnx, "x86-64", overrides={"verify.runs": 4}, **options).kept  # another recipe
    next(photos.iterdir()).unlink()
    assert not build(tiny_onnx, "x86-64", overrides={"verify.runs": 4}, **options).kept  # another calibration set
    (Path("out") / "model.onnx").write_bytes(b"altered")
    rebuilt = build(tiny_onnx, "x86-64", overrides={"verify.runs": 4}, **options)
    assert not rebuilt.kept and file_sha256(Path("out/model.onnx")) == first.report["artifact"]["sha256"]


def test_a_worker_killed_mid_build_is_retried_with_the_same_bytes(
        local_ray: None, tiny_onnx: Path, photos: Path, capsys: pytest.CaptureFixture[str]) -> None:
    matrix = _matrix(Path("m.toml"), '[[models]]\nmodel = "tiny.onnx"\n', 'target = ["x86-64", "jetson"]')
    killed: list[tuple[str, int]] = []  # (cell, worker pid)

    def kill_the_first_build() -> None:
        """Kill the worker process that writes a cell's staging folder (.<cell>.partial-<pid>): mid-build."""
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            for staging in Path("dist/fleet").glob(".*.partial-*"):
                cell, pid = staging.name[1:].rsplit(".partial-", 1)
                os.kill(int(pid), signal.SIGKILL)
                killed.append((cell, int(pid)))
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_the_first_build)
    killer.start()
    code, summary = _fleet(capsys, matrix)
    killer.join()
    assert killed, "no build was seen running"
    assert code == 0 and [row["status"] for row in summary["cells"]] == ["ok", "ok"]
    cell, pid = killed[0]
    assert not list(Path("dist/fleet").glob(f".*.partial-{pid}"))  # the retry removed the killed build's folder
    [row] = [row for row in summary["cells"] if row["cell"] == cell]
    assert file_sha256(_alone(row["command"], "alone")) == file_sha256(Path(row["folder"]) / "model.onnx")


def test_failed_cells_are_reported_and_the_rest_finish(
        local_ray: None, tiny_onnx: Path, photos: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = ('[[models]]\nmodel = "tiny.onnx"\n\n[[models]]\nmodel = "tiny.onnx"\nname = "tight"\n'
              'max-size-mb = 0.001\n\n[[models]]\nmodel = "missing.onnx"\n')
    code, summary = _fleet(capsys, _matrix(Path("m.toml"), models, 'target = ["x86-64"]'))
    rows = {row["cell"]: row for row in summary["cells"]}
    assert code == 2 == summary["exit_code"]  # the highest of the cells'
    assert rows["tiny-x86-64"]["status"] == "ok" and rows["tiny-x86-64"]["reason"] is None
    assert rows["tight-x86-64"]["exit_code"] == 1 and rows["tight-x86-64"]["reason"].startswith("max_size_mb ")
    assert rows["tight-x86-64"]["size_bytes"] > 1000  # a failed gate still built and reported
    assert rows["missing-x86-64"]["exit_code"] == 2 and "missing.onnx" in rows["missing-x86-64"]["reason"]
    assert "\n" not in rows["missing-x86-64"]["reason"] and "headline" not in rows["missing-x86-64"]
    assert "--max-size-mb 0.001" in rows["tight-x86-64"]["command"]


@pytest.mark.parametrize(("content", "says"), [
    ('[[models]]\nmodel = "a.onnx"\nbogus = 1\n[matrix]\ntarget = ["x86-64"]', "cell a-x86-64: unrecognized"),
    ('[[models]]\nmodel = "a.onnx"\n[matrix]\ntarget = ["x86-64"]\nprecision = ["fp8"]', "invalid choice"),
    ('[build]\ntarget = ["x86-64"]\n[[models]]\nmodel = "a.onnx"', "lists of values go in [matrix]"),
    ('[build]\nout = "x"\n[[models]]\nmodel = "a.onnx"', "the fleet's to set"),
    ('[matrix]\ntarget = ["x86-64"]', "at least one model"),
    ('[[models]]\nmodel = "a.onnx"\n[[models]]\nmodel = "b/a.onnx"\n[matrix]\ntarget = ["x86-64"]', "both named"),
    ("[[models]\n", "is not TOML"),
])
def test_a_bad_matrix_exits_2_naming_the_file_before_anything_runs(
        content: str, says: str, capsys: pytest.CaptureFixture[str]) -> None:
    Path("m.toml").write_text(content)
    assert main(["fleet", "m.toml"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgekit: m.toml") and says in lines[0]
    assert not Path("dist").exists()


def test_cells_are_named_and_sized_by_the_matrix() -> None:
    from edgekit.fleet import read_matrix

    Path("m.toml").write_text('[build]\neffort = "fast"\nno-cache = true\n[[models]]\nmodel = "dir/fish.onnx"\n'
                              'input-size = 64\n[[models]]\nmodel = "smollm2-135m"\nname = "lm"\n[matrix]\n'
                              'target = ["jetson"]\nbudget = ["size=4MB", "latency=2ms"]\n'
                              'recipe = ["recipes/slim.toml"]\n')
    cells = read_matrix(Path("m.toml"), Path("out"))
    assert [c.name for c in cells] == ["fish-jetson-size_4MB-slim", "fish-jetson-latency_2ms-slim",
                                       "lm-jetson-size_4MB-slim", "lm-jetson-latency_2ms-slim"]
    assert cells[0].command == ("edgekit build dir/fish.onnx --effort fast --no-cache --input-size 64 --target jetson "
                                "--budget size=4MB --recipe recipes/slim.toml --out out/fish-jetson-size_4MB-slim")
    assert cells[2].cpus > cells[0].cpus and cells[2].memory > cells[0].memory  # a language model asks for more


def test_fleet_joins_a_running_cluster_by_address(local_ray: None, tiny_onnx: Path, photos: Path) -> None:
    """The command in its own process, on the Ray this module started (as it would join a cluster's head)."""
    _matrix(Path("m.toml"), '[[models]]\nmodel = "tiny.onnx"\n', 'target = ["x86-64"]')
    address = ray.get_runtime_context().gcs_address
    done = subprocess.run([sys.executable, "-m", "edgekit", "fleet", "m.toml", "--address", address],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "tiny-x86-64" in done.stdout and "agreement 1.000" in done.stdout
    summary = json.loads(Path("dist/fleet/fleet.json").read_text())
    assert summary["ray"] == address and summary["cells"][0]["status"] == "ok"
    assert ray.cluster_resources()["CPU"] == 2  # the cluster outlives the fleet that joined it
    assert ray.get(ray.remote(_niceness).remote()) == os.nice(0)  # workers at the driver's priority, not Ray's 15


def _niceness() -> int:
    return os.nice(0)


def test_search_candidates_scored_on_ray_actors_give_the_search_its_own_result(local_ray: None, tiny_onnx: Path
                                                                               ) -> None:
    """A budget search whose selection steps score their children on Ray actors: the same draws, scores and
    chosen configuration as scoring here, with the children's fitness computed in the actors."""
    from ray import cloudpickle

    from edgekit.errors import UsageError
    from edgekit.search import evolve, parse_budget
    from edgekit.search.remote import ray_scorer

    from . import test_search

    cloudpickle.register_pickle_by_value(test_search)  # the actors cannot import the tests
    here, there = test_search._toy(units=8), test_search._toy(units=8)
    budget = parse_budget(f"latency={0.75 * here.base.latency_ms}ms")
    alone = evolve(here, budget, seed=3, generations=8)
    with ray_scorer(there, "local") as score_many:  # joins the module's Ray
        assert score_many is not None
        spread = evolve(there, budget, seed=3, generations=8, score_many=score_many)
    assert (spread.best, spread.scored, spread.evaluations) == (alone.best, alone.scored, alone.evaluations)
    assert len(there.calls) < len(here.calls) / 2  # here: only the starts and the parents
    assert ray.is_initialized()  # a search that joined a Ray leaves it running
    with pytest.raises(UsageError, match="give --budget too"):
        build(tiny_onnx, "x86-64", quiet=True, ray="local")
