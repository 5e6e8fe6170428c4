"""report.html: the page a person looks at before shipping an artifact, rendered from report.json alone.

One self-contained file: styles inline, charts inline SVG drawn by matplotlib, and a Content-Security-Policy that
forbids the page any load at all. Every number on it is the report's (or the manifest's); every string is escaped,
since report values carry user-supplied paths. The same report gives the same bytes (fixed SVG id salt, no dates),
so the page is listed in the manifest beside the files it describes.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from html import escape
from typing import Any

import numpy as np

from edgekit.report.schema import Report

TOP = 25  # bars a per-layer chart shows: the largest values
ROWS = 60  # rows a table shows; the rest stay in report.json (a segmenter's per-layer analysis has a thousand)
FIGURES = {"p50": "p50 {} ms", "p90": "p90 {} ms", "ms": "{} ms", "bound": "{}-bound", "tokens_per_s": "{} tokens/s",
           "decode_ms_per_token": "{} ms/token", "decode_bound": "decode {}-bound", "prefill_ms": "prefill {} ms"}
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 70em; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .4em 0; } th, td { padding: 2px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; font-weight: 600; } td table th { background: #fafafa; }
tr + tr td { border-top: 1px solid #eee; }
.passed, .ok { color: #176117; font-weight: 600; } .failed, .gate_failed { color: #b00020; font-weight: 600; }
.warned, .not_checked { color: #8a5a00; } .muted { color: #666; }
figure { margin: 1em 0; } figure svg { max-width: 100%; height: auto; } figcaption { color: #555; }
figure.example { max-width: 24em; }
"""


def render(report: dict[str, Any], manifest: dict[str, Any] | None = None) -> str:
    """The page for `report` (a report.json dict); `manifest` (manifest.json, when the folder has one) adds what
    went in and where each recipe value came from."""
    import matplotlib

    # fixed ids and text as text: the same report, the same bytes; no mathtext, since report strings may hold `$`
    with matplotlib.rc_context({"svg.hashsalt": "edgekit", "svg.fonttype": "none", "text.parse_math": False,
                                "font.size": 9}):
        charts = _layer_charts(report)
        body = [_headline(report), _gates(report), _examples(report.get("examples") or []),
                _section("Per layer", "\n".join(charts)) if charts else "", *_steps(report),
                _section("Stages", _rows(report.get("stages") or [])), _details(report), _manifest(manifest)]
    title = f"edgekit report: {report['model']['name']} for {report['target']['name']}"
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
            "img-src data:\">\n"
            f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(part for part in body if part) + "\n</body></html>\n")


def _examples(examples: list[dict[str, Any]]) -> str:
    """The first held-out inputs with the original's and the artifact's answers: a detector's boxes drawn on the
    frame (the original's solid, the artifact's dashed; hover for class and score), a classifier's five most
    probable classes side by side, a segmenter's masks overlaid (where they agree, where each covers alone), a
    language model's greedy continuations. The thumbnails are the report's own
    (inline JPEG: the page loads nothing)."""
    if not examples:
        return ""
    title = "What the artifact does to held-out inputs"
    if examples[0]["kind"] == "text":
        rows = [[e["prompt"], e["reference"], e["artifact"], f"{e['same_tokens']} of {e['tokens']}"] for e in examples]
        columns = ["prompt", _WHO["reference"], _WHO["artifact"], "same tokens"]
        return _section(title, "<p>Greedy continuations of held-out prompts; the tokens the two share from the start "
                        "are counted.</p>" + _table(columns, rows, "examples"))
    figures = []
    for example in examples:
        width, height = example["width"], example["height"]
        shapes = [f'<image href="data:image/jpeg;base64,{escape(example["image"])}" width="{width}" '
                  f'height="{height}"/>']
        if example["kind"] == "boxes":
            for who, dashes in (("reference", ""), ("artifact", ' stroke-dasharray="5 3"')):
                for found in example[who]:
                    x1, y1, x2, y2 = found["box"]
                    what = f"{_WHO[who]}: {_label(found)} {found['score']:.2f}"
                    shapes.append(f'<rect x="{x1 * width:.1f}" y="{y1 * height:.1f}" width="{(x2 - x1) * width:.1f}" '
                                  f'height="{(y2 - y1) * height:.1f}" fill="none" stroke="{_COLOURS[who]}" '
                                  f'stroke-width="2"{dashes}><title>{escape(what)}</title></rect>')
            answer = escape(f"{len(example['reference'])} boxes from the original, {len(example['artifact'])} from "
                            "the artifact")
        elif example["kind"] == "masks":
            shapes.append(f'<image href="data:image/png;base64,{escape(example["overlay"])}" width="{width}" '
                          f'height="{height}"/>')
            answer = escape(f"{example['instances']} instances, IoU with the original {example['iou_vs_original']:.3f}")
        else:
            answer = _table([_WHO["reference"], _WHO["artifact"]],
                            [[f"{_label(a)} ({a['p']:.3f})", f"{_label(b)} ({b['p']:.3f})"]
                             for a, b in zip(example["reference"], example["artifact"], strict=False)])
            if example.get("label") is not None:
                answer += f"<span class=\"muted\">labelled: {escape(_label(example['label']))}</span>"
        svg = (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
               f'height="{height}">{"".join(shapes)}</svg>')
        figures.append(f'<figure class="example">{svg}<figcaption>{escape(str(example.get("file") or ""))}'
                       f"</figcaption>{answer}</figure>")
    legend = {"boxes": "Boxes of score 0.25 and up: the original's solid green, the artifact's dashed orange "
                       "(hover for class and score).",
              "masks": "Each instance's mask from its box prompt, every instance of an image together: blue where "
                       "the original's and the artifact's both cover, green the original's alone, orange the "
                       "artifact's alone.",
              "classes": "The five most probable classes of the original and of the artifact."}[examples[0]["kind"]]
    return _section(title, f"<p>{legend}</p><div style=\"display:flex;flex-wrap:wrap;gap:1.5em\">"
                           f"{''.join(figures)}</div>")


_WHO = {"reference": "original", "artifact": "artifact"}
_COLOURS = {"reference": "#1a7f37", "artifact": "#e08a1e"}


def _label(found: dict[str, Any]) -> str:
    return str(found["name"]) if found.get("name") else f"class {found['class']}"


def _headline(report: dict[str, Any]) -> str:
    status = report.get("status", "ok")
    artifact = report["artifact"]
    metrics = {key: report[key] for key in report if key not in Report.model_fields}  # the family's headline keys
    latency = [[entry.get("label", key), _figures(entry), entry.get("runtime", report["target"]["name"])]
               if isinstance(entry, dict) else [key, entry, ""]  # a segmenter's `part`: what was timed
               for key, entry in report["latency_ms"].items()]
    return (f"<h1>{escape(report['model']['name'])} → {escape(report['target']['name'])}</h1>\n"
            f"<p>status <span class=\"{escape(status)}\">{escape(status)}</span> (exit "
            f"{1 if status == 'gate_failed' else 0}) · {escape(artifact['file'])} · {escape(artifact['precision'])} "
            f"{escape(artifact['format'])} · {escape(report['target']['description'])} · edgekit "
            f"{escape(str(report.get('edgekit_version')))}</p>\n"
            + _section("Headline", f"<p>{escape(str(report['accuracy'].get('summary', '')))}</p>"
                       + _table(["metric", "value"], [[key, value] for key, value in metrics.items()], "headline")
                       + _table(["size", "bytes"], [["artifact files", report["size_bytes"]],
                                                    [artifact["file"], artifact["size_bytes"]]])
                       + _table(["latency", "figures", "where"], latency, "latency")))


def _figures(entry: dict[str, Any]) -> str:
    """A latency entry's main figures, with their units."""
    return ", ".join(shown.format(_text(entry[key])) for key, shown in FIGURES.items() if entry.get(key) is not None)


def _gates(report: dict[str, Any]) -> str:
    gates = report.get("gates") or []
    rows = [[g["name"], g["status"], g.get("value"), g.get("limit"), g.get("basis"), g.get("reason", "")]
            for g in gates]
    body = _table(["gate", "verdict", "value", "limit", "basis", "reason"], rows, "gates") if rows else \
        "<p class=\"muted\">no gate was set</p>"
    return _section("Gates", body)


def _layer_charts(report: dict[str, Any]) -> list[str]:
    """Per-layer bars where the report has the rows: int8 sensitivity, weight-quantization error, and each
    latency entry's per-layer times (the estimate's, and any measured ones)."""
    quantization = report.get("quantization") or {}
    charts = []
    rows = quantization.get("sensitivity") or []
    if rows:
        charts.append(_bars("Sensitivity per layer: output noise-to-signal with that layer alone in int8",
                            [(r["layer"], r["nsr"]) for r in rows], "noise-to-signal ratio (nsr)"))
    rows = [r for r in quantization.get("layers") or [] if r.get("output_error") is not None]
    if rows:
        charts.append(_bars("Quantization error per layer (output_error)",
                            [(r["layer"] if r.get("block") is None else f"{r['block']}.{r['layer']}", r["output_error"])
                             for r in rows], "output error"))
    latency = report["latency_ms"]
    measured, estimated = latency.get("measured_host") or {}, latency.get("estimated_target") or {}
    if measured.get("layers") and estimated.get("layers"):
        charts.append(_block_shares(measured, estimated, report["target"]["name"]))
    for key, entry in latency.items():
        if isinstance(entry, dict) and entry.get("layers"):
            charts.append(_bars(f"Time per layer ({entry.get('label', key)}): latency_ms.{key}.layers",
                                [(r["name"], r["ms"]) for r in entry["layers"]], "ms"))
    return charts


def _block_shares(measured: dict[str, Any], estimated: dict[str, Any], target: str) -> str:
    """Where the time goes, per block of the model: each block's share of the host's profiled time beside its share
    of the target's estimate. Shares, since the two are different machines; a block far apart in the two is where
    the device model and the runtime disagree (a fusion the model does not know, a kernel slower than its class)."""
    here, there = _by_block(measured["layers"]), _by_block(estimated["layers"])
    totals = sum(here.values()) or 1.0, sum(there.values()) or 1.0
    blocks = sorted(set(here) | set(there), key=lambda b: -(here.get(b, 0.0) / totals[0] + there.get(b, 0.0)
                                                             / totals[1]))[:TOP]

    def draw(ax: Any) -> None:
        rows = np.arange(len(blocks))
        ax.barh(rows - 0.2, [100 * here.get(b, 0.0) / totals[0] for b in blocks], 0.4, color="#4062bb",
                label=f"{measured.get('label', 'measured: host')} (profiler, {measured.get('layers_profiled_runs')} "
                      "runs)")
        ax.barh(rows + 0.2, [100 * there.get(b, 0.0) / totals[1] for b in blocks], 0.4, color="#e08a1e",
                label=f"estimated: {target}")
        ax.set_yticks(rows, blocks)
        ax.invert_yaxis()
        ax.set_xlabel("share of the total time, %")
        ax.legend(loc="lower right")

    more = f", the {len(blocks)} largest of {len(set(here) | set(there))}" if len(set(here) | set(there)) > TOP else ""
    return _chart(f"Time per block: measured here {totals[0]:.3g} ms in all, estimated on {target} {totals[1]:.3g} ms"
                  + more,
                  draw, (8, 1.2 + 0.3 * len(blocks)))


def _by_block(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Milliseconds summed per block: the first two levels of the module an op's name carries (`features.3`,
    `model.23`), whether the exporter named it (`/features/features.3/conv/Conv`) or the runtime renamed it in a
    fusion (`InsertedPrecisionFreeCast_/model.3/conv/Conv_output_0_nchwc`); ops the runtime added (layout
    reorders) are a block of their own."""
    from edgekit.passes.export import module_path

    blocks: dict[str, float] = {}
    for row in rows:
        name = row["name"]
        if "/" not in name:
            block = "(added by the runtime)"
        else:
            block = ".".join(module_path(name[name.index("/"):]).split(".")[:2]) or "(top level)"
        blocks[block] = blocks.get(block, 0.0) + row["ms"]
    return blocks


def _steps(report: dict[str, Any]) -> list[str]:
    """The compression steps the build took, as tables; a search adds its Pareto front, a layer-by-layer
    comparison (`edgekit diff`) its error along the graph."""
    parts = []
    for key in ("search", "pruning", "distillation", "finetune", "slimming", "quantization", "diff"):
        block = report.get(key)
        if block:
            chart = _front(block) if key == "search" and block.get("front") else \
                _departure(block) if key == "diff" and block.get("rows") else ""
            parts.append(_section(key.capitalize(), chart + _kv(block)))
    return parts


def _departure(diff: dict[str, Any]) -> str:
    rows = diff["rows"]

    def draw(ax: Any) -> None:
        ax.plot(range(len(rows)), [row["rel_error"] for row in rows], ".-", color="#4062bb")
        ax.axhline(diff["departs_at"], color="#b00020", linewidth=0.8, linestyle="--")
        for name, color in (("first_departure", "#b00020"), ("worst", "#c77700")):
            index = next((i for i, row in enumerate(rows) if row["layer"] == diff.get(name)), None)
            if index is not None:
                ax.plot(index, rows[index]["rel_error"], "o", color=color, fillstyle="none", markersize=10,
                        label=f"{name.replace('_', ' ')}: {rows[index]['layer']}")
        ax.set_xlabel("layer, in the graph's order")
        ax.set_ylabel("relative error to the original")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()

    return _chart(f"Where the artifact departs from the original ({diff['layers']} layers, {diff['images']} "
                  f"held-out images, the artifact run on {diff.get('ran_on', 'host')}; dashed: {diff['departs_at']})",
                  draw, (7, 3.2))


def _front(search: dict[str, Any]) -> str:
    def draw(ax: Any) -> None:
        points = sorted(search["front"], key=lambda p: p["latency_ms"])
        ax.plot([p["latency_ms"] for p in points], [p["fitness"] for p in points], "o-", color="#4062bb",
                label="front")
        for name, marker, color in (("uniform", "s", "#c77700"), ("chosen", "*", "#b00020")):
            point = search.get(name)
            if point and point.get("latency_ms") is not None:
                ax.plot(point["latency_ms"], point["fitness"], marker, color=color, markersize=12,
                        label=f"{name} ({point.get('level', '')})" if name == "uniform" else name, fillstyle="none")
        ax.set_xlabel(f"latency, ms ({search.get('latency_label') or 'estimated'})")
        ax.set_ylabel("fitness (lower is closer to the original)")
        ax.legend()

    return _chart(f"Pareto front of the search ({len(search['front'])} points), budget {search.get('budget')}",
                  draw, (7, 3.6))


def _bars(title: str, rows: list[tuple[str, float]], unit: str) -> str:
    shown = sorted(rows, key=lambda row: -row[1])[:TOP]
    values = [value for _, value in shown]
    log = min(values) > 0 and max(values) > 100 * min(values)  # several decades: a linear axis shows one bar

    def draw(ax: Any) -> None:
        from matplotlib.ticker import NullFormatter

        ax.barh(range(len(shown)), values, color="#4062bb")
        ax.set_yticks(range(len(shown)), [name for name, _ in shown])
        ax.invert_yaxis()
        ax.set_xlabel(unit + (" (log scale)" if log else ""))
        if log:  # tick labels as plain numbers (mathtext is off)
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter("{x:g}")
            ax.xaxis.set_minor_formatter(NullFormatter())

    more = f", the {len(shown)} largest of {len(rows)}" if len(rows) > len(shown) else ""
    return _chart(title + more, draw, (8, 0.9 + 0.2 * len(shown)))


def _chart(title: str, draw: Callable[[Any], None], size: tuple[float, float]) -> str:
    """A figure drawn by `draw` on one axes, as inline SVG with its caption."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=size)
    draw(figure.subplots())
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    svg = buffer.getvalue()
    return f"<figure class=\"chart\">{svg[svg.index('<svg'):]}<figcaption>{escape(title)}</figcaption></figure>"


def _details(report: dict[str, Any]) -> str:
    keys = ("model", "target", "artifact", "accuracy", "analysis", "ops", "device", "deploy", "cache")
    notes = "".join(f"<li>{escape(str(note))}</li>" for note in report.get("notes") or [])
    return _section("Details", (f"<ul>{notes}</ul>" if notes else "")
                    + _kv({key: report[key] for key in keys if report.get(key)}))


def _manifest(manifest: dict[str, Any] | None) -> str:
    """What went in, and the recipe values that did not come from edgekit's defaults."""
    if not manifest:
        return ""
    recipe = manifest.get("recipe") or {}

    def value(dotted: str) -> Any:
        node: Any = recipe
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    origins = manifest.get("origins") or {}
    chosen = [[key, value(key), origin] for key, origin in origins.items() if origin != "default"]
    defaults = len(origins) - len(chosen)
    return _section("Manifest", _kv({"inputs": manifest.get("inputs"), "seed": manifest.get("seed"),
                                     "platform": manifest.get("platform")})
                    + _table(["recipe value", "resolved", "from"], chosen)
                    + f"<p class=\"muted\">{defaults} other recipe values are edgekit's defaults</p>")


def _section(title: str, body: str) -> str:
    return f"<section><h2>{escape(title)}</h2>\n{body}\n</section>"


def _kv(data: dict[str, Any]) -> str:
    return "<table>" + "".join(f"<tr><th>{escape(str(key))}</th><td>{_cell(value)}</td></tr>"
                               for key, value in data.items()) + "</table>"


def _rows(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    more = f"<p class=\"muted\">{len(rows) - ROWS} more rows in report.json</p>" if len(rows) > ROWS else ""
    return _table(columns, [[row.get(key) for key in columns] for row in rows[:ROWS]]) + more


def _table(columns: list[str], rows: list[list[Any]], name: str = "") -> str:
    head = "".join(f"<th>{escape(str(column))}</th>" for column in columns)
    body = "".join("<tr>" + "".join(_td(column, value) for column, value in zip(columns, row, strict=True)) + "</tr>"
                   for row in rows)
    attribute = f' class="{name}"' if name else ""
    return f"<table{attribute}><tr>{head}</tr>{body}</table>"


def _td(column: str, value: Any) -> str:
    verdict = column == "verdict"  # a gate's status, coloured
    return f"<td class=\"{escape(str(value))}\">{_cell(value)}</td>" if verdict else f"<td>{_cell(value)}</td>"


def _cell(value: Any) -> str:
    if isinstance(value, dict):
        return _kv(value) if value else ""
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        return _rows(value)
    if isinstance(value, list):
        return escape(", ".join(_text(item) for item in value))
    return escape(_text(value))


def _text(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
