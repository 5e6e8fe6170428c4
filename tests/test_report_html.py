"""report.html: a page that parses, shows the report's own headline numbers and gates, draws every chart it names,
escapes what users wrote, loads nothing, and is the same bytes for the same report."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

import edgekit
from edgekit.cli import main
from edgekit.data import file_sha256
from edgekit.report.html import render
from edgekit.report.schema import Report
from edgekit.report.write import MARKER, replaceable

from .conftest import PHOTOS, TinyNet, settle_batchnorm

HOSTILE = "<script>alert(1)</script>"
DRAWN = {"path", "rect", "line", "polyline", "polygon", "circle", "use"}


class Page(HTMLParser):
    """What a reader sees: the rows of the headline, latency and gates tables, each chart's caption and how many
    shapes its SVG draws, each example's caption with its images and boxes, and every tag and link."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.charts: list[tuple[str, int]] = []
        self.examples: list[tuple[str, int, int]] = []  # caption, images, boxes
        self._figure = ""
        self._drawn: list[str] = []
        self.tags: set[str] = set()
        self.links: list[str] = []
        self._table: list[str] = []
        self._cell: list[str] | None = None
        self._row: list[str] = []
        self._shapes: int | None = None
        self._caption: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.links += [value or "" for name, value in attrs if name in ("href", "xlink:href", "src")]
        if tag == "figure":
            self._figure, self._drawn = dict(attrs).get("class") or "", []
        elif tag in ("image", "rect"):
            self._drawn.append(tag)
        if tag == "table":
            self._table.append(dict(attrs).get("class") or "")
        elif tag in ("td", "th") and self._table and self._table[-1]:
            self._cell = []
        elif tag == "svg" and self._shapes is None:
            self._shapes = 0
        elif tag in DRAWN and self._shapes is not None:
            self._shapes += 1
        elif tag == "figcaption":
            self._caption = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table.pop()
        elif tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr" and self._table and self._table[-1]:
            self.tables.setdefault(self._table[-1], []).append(self._row)
            self._row = []
        elif tag == "figcaption" and self._caption is not None:
            caption = "".join(self._caption)
            if self._figure == "example":
                self.examples.append((caption, self._drawn.count("image"), self._drawn.count("rect")))
            else:
                self.charts.append((caption, self._shapes or 0))
            self._caption, self._shapes = None, None

    def handle_data(self, data: str) -> None:
        for sink in (self._cell, self._caption):
            if sink is not None:
                sink.append(data)

    def column(self, table: str) -> dict[str, list[str]]:
        return {row[0]: row[1:] for row in self.tables[table][1:]}


def assert_page(folder: Path) -> Page:
    """The build folder's report.html against its report.json and manifest.json."""
    report = json.loads((folder / "report.json").read_text())
    text = (folder / "report.html").read_text(encoding="utf-8")
    page = Page(text)
    headline = page.column("headline")
    for key in set(report) - set(Report.model_fields):  # the family's headline metrics
        value = report[key]
        shown = headline[key][0]
        assert shown == "–" if value is None else float(shown) == pytest.approx(value, rel=1e-5), (key, shown)
    assert {name: row[0] for name, row in page.column("gates").items()} == {
        g["name"]: g["status"] for g in report["gates"]}
    assert set(page.column("latency")) == {entry["label"] if isinstance(entry, dict) else key
                                           for key, entry in report["latency_ms"].items()}
    assert f">{report['status']}<" in text
    captions = [caption for caption, _ in page.charts]
    assert all(shapes > 0 for _, shapes in page.charts), page.charts
    if (report.get("quantization") or {}).get("sensitivity"):
        assert any(caption.startswith("Sensitivity per layer") for caption in captions)
    if report["latency_ms"]["estimated_target"].get("layers"):
        assert any(caption.startswith("Time per layer (estimated)") for caption in captions)
    if report["latency_ms"]["measured_host"].get("layers"):
        assert any(caption.startswith("Time per layer (measured: host)") for caption in captions)
        assert any(caption.startswith("Time per block: measured here") for caption in captions)
    if report.get("search"):
        assert any(caption.startswith("Pareto front") for caption in captions)
    if report.get("diff"):
        assert any(caption.startswith("Where the artifact departs from the original") for caption in captions)
    assert not page.tags & {"script", "link", "img", "iframe", "object"}
    # nothing outside the page: links within it, and each example's thumbnail inline
    assert all(link.startswith(("#", "data:image/jpeg;base64,", "data:image/png;base64,")) for link in page.links)
    examples = [e for e in report.get("examples") or [] if e["kind"] != "text"]  # those with a thumbnail
    assert [(e["file"], 2 if e["kind"] == "masks" else 1) for e in examples] == \
        [(caption, images) for caption, images, _ in page.examples]  # a segmenter's: the thumbnail and its masks
    assert [len(e["reference"]) + len(e["artifact"]) if e["kind"] == "boxes" else 0 for e in examples] == \
        [boxes for *_, boxes in page.examples]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["outputs"]["report.html"]["sha256"] == file_sha256(folder / "report.html")
    return page


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny INT8 classifier build (sensitivity and per-layer estimate rows), shared by this module's tests."""
    root = tmp_path_factory.mktemp("page")
    photos = root / "photos"
    photos.mkdir()
    for path in PHOTOS[::8][:12]:
        shutil.copy(path, photos / path.name)
    torch.manual_seed(0)
    edgekit.build(settle_batchnorm(TinyNet(), 32), "raspberry-pi-5", calib=photos, input_size=32, precision="int8",
                  format="onnx", overrides={"verify.runs": 3, "verify.warmup": 1, "quantize.sensitivity_images": 2},
                  use_cache=False, quiet=True, out=root / "out")
    return root / "out"


def test_a_classifier_build_writes_its_page(built: Path) -> None:
    page = assert_page(built)
    assert len(page.charts) == 4  # sensitivity, time per block, time per layer estimated and measured
    report = json.loads((built / "report.json").read_text())
    assert len(page.examples) == 3 and all(e["kind"] == "classes" for e in report["examples"])  # every held-out one
    for example in report["examples"]:  # the original's and the artifact's five most probable classes
        assert [len(example["reference"]), len(example["artifact"])] == [3, 3]  # every class of three
        assert example["label"] is None  # an unlabelled folder
        assert example["reference"][0]["p"] >= example["reference"][-1]["p"] > 0
    measured = report["latency_ms"]["measured_host"]
    assert measured["layers_profiled_runs"] == 3 and all(row["ms"] > 0 for row in measured["layers"])
    assert {row["op"] for row in measured["layers"]} & {"QLinearConv", "Conv"}  # onnxruntime's own node names
    assert page.column("headline")["top1_agreement"] == [f"{report['top1_agreement']:.6g}"]
    assert "report.html" in json.loads((built / MARKER).read_text())["files"]


def test_a_detector_example_draws_both_models_boxes_on_its_thumbnail(built: Path) -> None:
    report = json.loads((built / "report.json").read_text())
    box = {"box": [0.1, 0.2, 0.5, 0.6], "score": 0.8, "class": 0, "name": HOSTILE}
    report["examples"] = [{**report["examples"][0], "kind": "boxes", "reference": [box, box], "artifact": [box]}]
    page = Page(render(report))
    assert page.examples == [(report["examples"][0]["file"], 1, 3)]  # one thumbnail, three boxes
    assert HOSTILE not in render(report)  # class names are escaped in each box's title


def test_the_same_report_renders_to_the_same_bytes(built: Path) -> None:
    report = json.loads((built / "report.json").read_text())
    assert render(report) == render(copy.deepcopy(report))
    changed = copy.deepcopy(report)
    changed["latency_ms"]["estimated_target"]["layers"][0]["ms"] *= 2
    assert render(changed) != render(report)


def test_user_strings_are_escaped_in_tables_and_charts(built: Path) -> None:
    report = json.loads((built / "report.json").read_text())
    report["model"]["source"] = f"/data/{HOSTILE}/model.pth"
    report["notes"].append("</table><img src=x onerror=alert(1)>")
    report["quantization"]["sensitivity"][0]["layer"] = f"{HOSTILE} $x$"
    report["latency_ms"]["estimated_target"]["layers"][0]["name"] = HOSTILE
    report["stages"][0]["note"] = '"><iframe src="http://example.com">'
    text = render(report)
    page = Page(text)
    assert not page.tags & {"script", "img", "iframe"} and HOSTILE not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text  # shown, as text
    assert all(shapes > 0 for _, shapes in page.charts)


def test_edgekit_report_rewrites_the_page_byte_for_byte(built: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(built, folder)
    written = (folder / "report.html").read_bytes()
    (folder / "report.html").unlink()
    assert main(["report", str(folder)]) == 0
    assert (folder / "report.html").read_bytes() == written
    assert capsys.readouterr().out.strip() == f"wrote {folder / 'report.html'}"
    assert (folder / "manifest.json").read_bytes() == (built / "manifest.json").read_bytes()


def test_a_folder_from_before_the_page_gains_it_and_stays_replaceable(built: Path, tmp_path: Path) -> None:
    folder = tmp_path / "older"
    shutil.copytree(built, folder)
    (folder / "report.html").unlink()
    marker = json.loads((folder / MARKER).read_text())
    (folder / MARKER).write_text(json.dumps({**marker, "files": [f for f in marker["files"] if f != "report.html"]}))
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["outputs"]["report.html"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert main(["report", str(folder)]) == 0
    assert replaceable(folder) is None  # a later build may still replace it
    assert_page(folder)


@pytest.mark.parametrize(("content", "problem"), [
    (None, "report.json: No such file or directory"),
    ("{not json", "report.json is not JSON"),
    ('{"model": {"name": "x"}}', "report.json is not an edgekit report"),
    ("[1, 2]", "report.json is not a JSON object"),
])
def test_edgekit_report_refuses_a_folder_without_a_report(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          content: str | None, problem: str) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    if content is not None:
        (folder / "report.json").write_text(content)
    assert main(["report", str(folder)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"{folder / problem}" in err
    assert not (folder / "report.html").exists()


def _chromium(page: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium or chromium-browser on PATH: the page is not opened in a browser here")
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                           *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)


def test_the_page_opens_in_headless_chromium_without_errors_or_empty_charts(built: Path, tmp_path: Path) -> None:
    opened = _chromium(built / "report.html")
    assert opened.returncode == 0, opened.stderr[-2000:]
    errors = [line for line in opened.stderr.splitlines() if "CONSOLE" in line or "Refused to" in line]
    assert not errors, errors  # console messages, a load the page's policy refused
    # a copy with a probe that writes each chart's drawn size into the DOM (the page itself allows no script)
    probe = tmp_path / "probe.html"
    text = (built / "report.html").read_text(encoding="utf-8")
    probe.write_text(text.replace("default-src 'none'", "default-src 'none'; script-src 'unsafe-inline'").replace(
        "</body>", "<script>for (const svg of document.querySelectorAll('figure.chart svg')) {"
        "const box = svg.getBBox(), shown = svg.getBoundingClientRect();"
        "svg.parentElement.dataset.drawn = Math.min(box.width, box.height, shown.width, shown.height);}</script>"
        "</body>"), encoding="utf-8")
    measured = _chromium(probe, "--window-size=1200,900")
    sizes = [float(part.split('"')[0]) for part in measured.stdout.split('data-drawn="')[1:]]
    assert len(sizes) == len(Page(text).charts) and all(size > 10 for size in sizes), sizes
