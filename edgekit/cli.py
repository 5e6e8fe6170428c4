"""The `edgekit` command: parses arguments, calls the Python API, prints, and maps errors to exit codes.

Exit codes: 0 built and verified; 1 built but a gate failed; 2 bad input or usage; 3 a stage failed.
Set EDGEKIT_DEBUG=1 to see the traceback behind a one-line error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import TYPE_CHECKING, Any, NoReturn

from edgekit.errors import EdgekitError, StageError, UsageError, first_line

if TYPE_CHECKING:
    from edgekit.targets import Target

BUILD_EXAMPLES = """\
examples:
  edgekit build mobilenet_v2 --target raspberry-pi-5
  edgekit build ./fish.pth --arch mobilenet_v3_small --num-classes 12 \\
      --target jetson --calib ./photos/ --eval ./labelled/ --precision fp16
  edgekit build model.onnx --target x86-64 --max-top1-drop 0.5 --json
  edgekit build smollm2-135m --target android-arm64 --precision int4 --eora-rank 32
  edgekit build smollm2-135m --target android-arm64 --budget bytes=90MB

data folders:
  --calib and --eval take folders of images (searched recursively). Labels for top-1
  come from the --eval layout: a folder per class (class index = sorted folder names,
  or the order in classes.txt), or ImageNet synset file names (n01440764_tench.JPEG).
  Without --eval, every 4th calibration image is held out for verification.
  Language models take text instead: a .txt file (paragraphs) or a folder of .txt
  files; by default the Wikipedia articles in the gensim wheel, every 5th held out.

exit codes:
  0 built and verified   1 a gate failed   2 bad input or usage   3 a stage failed
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse exits 2 too; keep its message to one line
        self.print_usage(sys.stderr)
        raise UsageError(message)


class _CommandParser(_Parser):
    """A command's arguments: every one without a type of its own (a name, a path, a URL) must not be empty.
    (Not the top-level parser's: argparse passes a command's whole argument list through the command type.)"""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register("type", None, _given)


def _count(text: str) -> int:
    """A whole number of at least 0 (a negative one would slice a table from its end)."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 0, got {text!r}")
    return int(text)


def _given(text: str) -> str:
    """An empty name or path is refused: left to the commands it would read as "not given" (`--out ''` writing to
    dist/, `--calib ''` calibrating on the shipped photos)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty")
    return text


def _device_arguments(group: Any, required: bool, also: str = " (also verify there)") -> None:
    also = "" if required else also
    group.add_argument("--device", required=required, metavar="URL",
                       help=f"the device's `edgekit agent`: http://board:8765{also}")
    group.add_argument("--device-token", help="the agent's token (default: $EDGEKIT_AGENT_TOKEN)")


def _parser() -> argparse.ArgumentParser:
    from edgekit import __version__

    parser = _Parser(prog="edgekit", description="Turn a trained model into a small, fast, verified artifact "
                     "for one edge device.")
    parser.add_argument("--version", action="version", version=f"edgekit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)

    b = commands.add_parser("build", help="build and verify an artifact for a target",
                            description="Load, export, convert, verify on held-out images, and write "
                            "the artifact with report.json and manifest.json.",
                            epilog=BUILD_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("model", help="a model name (mobilenet_v2, efficientnet_lite0, yolo11n, smollm2-135m), a .pth "
                   "state dict, an Ultralytics .pt, a Hugging Face causal-LM folder, a .gguf, or an .onnx file")
    b.add_argument("--target", "-t", required=True, help="device name or alias (see `edgekit targets`) or a .toml")
    model = b.add_argument_group("model")
    model.add_argument("--arch", help="architecture of a state dict: a torchvision classifier name, or a timm one "
                       "(timm/ may prefix it)")
    model.add_argument("--num-classes", type=int, help="classes of a state dict (default: read from its weights)")
    model.add_argument("--input-size", type=int, help="square input side in pixels (default 224)")
    data = b.add_argument_group("data")
    data.add_argument("--calib", help="calibration images (default: the set shipped in calibration/)")
    data.add_argument("--eval", help="held-out images for verification, labelled by folder or file name")
    data.add_argument("--train", help="labelled images to fine-tune on after --prune or --budget: a classifier's in "
                      "one folder per class (or ImageNet synset names), a detector's with YOLO label files (images/ "
                      "-> labels/); kept only if its last held-out batch says it helped (recipe [finetune] steps, "
                      "seconds, lr, batch)")
    data.add_argument("--eval-limit", type=int, help="verify on at most this many images (default 200)")
    stages = b.add_argument_group("stages")
    stages.add_argument("--recipe", help="recipe .toml: stages, parameters and gates (flags override it)")
    stages.add_argument("--effort", choices=["fast", "default", "max"], default="default",
                        help="fast: no tflite int8 range search or layer refit, fewer sensitivity and bias-correction "
                        "images, a 10-generation 3-minute search, RTN instead of GPTQ (for an app's CI; the "
                        "README says what it costs); max: more of each; a recipe file or flag still wins")
    stages.add_argument("--precision", choices=["fp32", "fp16", "int8", "int4"],
                        help="artifact precision (default: the target's)")
    stages.add_argument("--format", choices=["onnx", "tflite", "gguf", "openvino", "pte"],
                        help="artifact format (default: the target's; gguf: language models for llama.cpp; "
                        "openvino: IR model.xml + model.bin; pte: ExecuTorch program, XNNPACK-delegated)")
    stages.add_argument("--int8-mode", choices=["static", "dynamic"],
                        help="tflite int8: full-integer, calibrated (static, default) or dynamic-range")
    stages.add_argument("--opset", type=int, help="ONNX opset (default: the target runtime's)")
    stages.add_argument("--max-float-layers", type=int,
                        help="int8: most layers the accuracy gates may keep in float (default 8)")
    stages.add_argument("--prune", type=float, metavar="RATIO",
                        help="remove this share of each prunable layer's channels (0-1; torch models)")
    stages.add_argument("--budget", metavar="KIND=VALUE",
                        help="compress to a budget on the target: latency=6ms (estimated there), size=4MB, "
                        "macs=1.5G (image models), bytes=90MB or tokens_per_s=40 (language models); a search picks "
                        "each unit's level (image models: each block's pruning; language models: each block's "
                        "attention and MLP weights, int8/int4/+EoRA; not with --prune)")
    stages.add_argument("--ray", metavar="ADDRESS",
                        help="score --budget's search candidates on Ray actors: auto (this machine's cluster), "
                        "ray://head:10001, or local (a Ray started here); the search's result is the same as without")
    stages.add_argument("--distill-steps", type=int,
                        help="after --prune or --budget: training steps towards the original on the calibration "
                        "images")
    stages.add_argument("--runs", type=int, help="timed inferences for host latency (default 50)")
    stages.add_argument("--threads", type=int, help="threads for host latency (default: the target's, capped by cores)")
    stages.add_argument("--seed", type=int, help="random seed recorded in the manifest (default 0)")
    lm = b.add_argument_group("language models (int4/int8 are weight-only)")
    lm.add_argument("--method", choices=["gptq", "rtn"], help="weight rounding: GPTQ (default) or round-to-nearest")
    lm.add_argument("--group-size", type=int, help="input columns sharing a scale, a power of two (default 64)")
    lm.add_argument("--eora-rank", type=int, help="EoRA low-rank compensation rank per layer (default 0: none)")
    gates = b.add_argument_group("gates (default: the target's budgets)")
    gates.add_argument("--max-top1-drop", type=float, help="most top-1 points the artifact may lose (needs labels)")
    gates.add_argument("--min-agreement", type=float, help="least top-1 agreement with the original, 0..1")
    gates.add_argument("--max-size-mb", type=float, help="largest artifact in MB")
    gates.add_argument("--max-latency-ms", type=float,
                       help="slowest target latency, per token for language models (estimated unless measured there)")
    gates.add_argument("--max-ppl-ratio", type=float, help="language models: highest perplexity / the original's")
    _device_arguments(b.add_argument_group("real device (an `edgekit agent` on the board)"), required=False)
    output = b.add_argument_group("output")
    output.add_argument("--out", "-o", help="artifact folder (default: dist/<name>-<target>)")
    output.add_argument("--no-cache", action="store_true", help="do not read or write the array cache")
    output.add_argument("--json", action="store_true", help="print report.json to stdout")
    output.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")

    f = commands.add_parser(
        "fleet", help="build a matrix of models x targets x precisions, recipes, budgets on Ray",
        description="Run every cell of a matrix file (each exactly one `edgekit build` command line) on Ray, one "
        "build per task: a local Ray started here by default, or a cluster with --address. A cell whose folder "
        "already holds its build (same inputs, recipe, edgekit) is kept, not rebuilt; a worker that dies is "
        "retried; a failed cell is reported and the others go on. Writes OUT/fleet.json and OUT/index.html.",
        epilog=FLEET_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("matrix", help="the matrix .toml: [build] flags, [[models]], [matrix] lists (examples/fleet/)")
    f.add_argument("--out", "-o", default="dist/fleet", help="folder of every cell's build folder and the summary "
                   "(default dist/fleet; on a cluster, storage every node shares)")
    f.add_argument("--address", help="an existing Ray cluster (auto, or HEAD:6379 from a node of it); default: a "
                   "local Ray on this machine's cores")
    f.add_argument("--cache", help="the array cache every build shares (default: $EDGEKIT_CACHE or "
                   "~/.cache/edgekit; on a cluster, shared storage)")
    f.add_argument("--json", action="store_true", help="print fleet.json to stdout")
    f.add_argument("--quiet", "-q", action="store_true", help="no line per finished cell on stderr")

    v = commands.add_parser(
        "verify", help="verify a built artifact on a real device through its agent",
        description="Send a built artifact to an `edgekit agent` on the device, run it there on the held-out "
        "inputs recreated from manifest.json, compare its outputs with the original model's, and add the "
        "device's figures (labelled `measured: <device>`) and gate results to report.json.",
        epilog="example:\n  edgekit agent --port 8765                    # on the board (prints its token)\n"
        "  EDGEKIT_AGENT_TOKEN=... edgekit verify dist/mobilenet_v2-raspberry-pi-5 --device http://pi:8765\n\n"
        "exit codes: 0 verified, gates hold   1 a gate failed   2 bad input   3 the device run failed",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("artifact", help="a build folder (dist/<name>-<target>)")
    _device_arguments(v, required=True)
    v.add_argument("--json", action="store_true", help="print the updated report.json")
    v.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")

    a = commands.add_parser(
        "agent", help="serve verification requests on a device (run this on the board)",
        description="Run artifacts sent by `edgekit build/verify --device` in this device's onnxruntime and "
        "LiteRT, one job at a time per runtime, and answer with outputs and latency. Requests need the token; "
        "only ONNX and TFLite models and plain arrays are accepted, nothing touches the filesystem.")
    a.add_argument("--port", type=int, default=8765, help="port to listen on (default 8765)")
    a.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0: every interface)")
    a.add_argument("--token-file", help="file holding the shared token, 8+ characters "
                   "(default: $EDGEKIT_AGENT_TOKEN, else a new one is printed)")
    a.add_argument("--token", help="the token itself (visible in the process list: prefer --token-file)")
    a.add_argument("--tls-cert", help="serve HTTPS with this PEM certificate (chain); needs --tls-key")
    a.add_argument("--tls-key", help="the PEM private key of --tls-cert")
    a.add_argument("--name", help="device name in reports (default: the host name)")
    a.add_argument("--max-mb", type=float, default=256, help="largest request in MB (default 256)")
    a.add_argument("--queue", type=int, default=64, help="jobs waiting per runtime before refusing (default 64)")
    a.add_argument("--job-timeout", type=float, default=300, help="seconds one job may run (default 300)")
    a.add_argument("--memory-mb", type=float, default=512,
                   help="request bodies held at once, read or queued, in MB (default 512)")
    a.add_argument("--max-connections", type=int, default=128,
                   help="connections served at once, waiting ones included; more are answered 503 (default 128)")
    a.add_argument("--request-timeout", type=float, default=120,
                   help="seconds a whole request may take to arrive (default 120)")
    a.add_argument("--emulated", action="store_true",
                   help="running under emulation (tools/emulate-aarch64.sh): latencies are labelled emulated")
    a.add_argument("--quiet", "-q", action="store_true", help="no request log")

    r = commands.add_parser(
        "report", help="rewrite a build folder's report.html from its report.json",
        description="Render a build folder's report.json (and manifest.json) as report.html: one self-contained page "
        "with the headline metrics, gates, per-layer charts and the compression steps. Every build writes it; "
        "this rewrites it, e.g. for a folder built by an earlier edgekit.")
    r.add_argument("folder", help="a build folder (dist/<name>-<target>)")

    d = commands.add_parser(
        "diff", help="where a built artifact starts to differ from the original, layer by layer",
        description="Run the original torch model and the built ONNX or TFLite artifact on the first held-out "
        "inputs (recreated from manifest.json) and compare every block's output (each container module whose output "
        "the artifact computes too, matched by the exporter's scope names): relative error and cosine. Marks the first "
        "layer whose relative error reaches 0.1 and the worst one. Image models built from torch; layers a "
        "search or pruning narrowed inside a block are skipped, block boundaries compared.",
        epilog="example:\n  edgekit build mobilenet_v2 --target x86-64 --precision int8 --calib ./photos/\n"
        "  edgekit diff dist/mobilenet_v2-x86-64 --images 8\n"
        "  edgekit diff dist/mobilenet_v2-x86-64 --device http://board:8765   # the artifact runs on the board\n\n"
        "exit codes: 0 compared (whatever it found)   2 bad input (no build folder, not an image model built from "
        "torch, neither ONNX nor TFLite)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("folder", help="a build folder (dist/<name>-<target>) of an image model built from torch")
    d.add_argument("--images", type=int, default=4, help="held-out inputs to compare on (default 4)")
    _device_arguments(d.add_argument_group("real device (an `edgekit agent` on the board; ONNX artifacts)"),
                      required=False, also=" (the artifact runs there)")
    d.add_argument("--json", action="store_true", help="print the comparison as JSON")
    d.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")

    t = commands.add_parser("targets", help="list device profiles",
                            description="Device profiles from targets/*.toml: peaks, bandwidth, runtime, defaults.")
    t.add_argument("--json", action="store_true", help="print the profiles as JSON")

    i = commands.add_parser("inspect", help="parameters, MACs, weight bytes and a per-layer table",
                            description="Analyze a model without building: the figures come from its ONNX graph.")
    i.add_argument("model", help="a model name, a .pth state dict (with --arch), or an .onnx file")
    i.add_argument("--arch", help="architecture of a state dict")
    i.add_argument("--num-classes", type=int, help="classes of a state dict (default: read from its weights)")
    i.add_argument("--input-size", type=int, help="square input side in pixels (default 224)")
    i.add_argument("--top", type=_count, default=20, help="layers to list, by MACs (0: all; default 20)")
    i.add_argument("--json", action="store_true", help="print the full analysis as JSON")
    g = commands.add_parser(
        "generate", help="generate text with a built language model, in its runtime through its key/value cache",
        description="Greedy generation from a prompt with a language-model artifact folder (model.onnx or "
        "model.xml + model.bin, and tokenizer/; or model.gguf), in onnxruntime, OpenVINO or llama.cpp: the decode "
        "loop an app runs, the prompt once, then one token at a time with the cache.")
    g.add_argument("artifact", help="a language-model build folder (dist/<name>-<target>)")
    g.add_argument("prompt", help="the text to continue")
    g.add_argument("--tokens", type=int, default=40, help="tokens to generate (default 40)")
    g.add_argument("--threads", type=int, default=2, help="runtime threads (default 2)")
    e = commands.add_parser(
        "estimate", help="latency of an artifact on a target, from the device model; --validate checks it here",
        description="Estimate an artifact's latency on a target, op by op, from the device model (the target's "
        "peaks, bandwidth and per-kernel efficiencies in targets/*.toml). --validate calibrates the model for "
        "this host by microbenchmarks, then estimates and measures each artifact here and prints the error.",
        epilog=ESTIMATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("artifacts", nargs="*", help="model.onnx / model.tflite files or build folders")
    e.add_argument("--target", "-t", help="device name, alias or .toml (default: x86-64; not with --validate)")
    e.add_argument("--validate", action="store_true", help="estimate for this host and measure here; print the error")
    e.add_argument("--calibrate-host", metavar="OUT.toml",
                   help="run the microbenchmarks and write this host's profile as a target file")
    e.add_argument("--threads", type=int, default=1, help="threads for --validate and --calibrate-host (default 1)")
    e.add_argument("--recalibrate", action="store_true", help="re-run the microbenchmarks instead of the cached ones")
    e.add_argument("--top", type=_count, default=10, help="slowest layers to list per artifact (default 10)")
    e.add_argument("--fit-published", metavar="TARGET",
                   help="fit TARGET's [latency] numbers to targets/measurements/TARGET.csv and print each row's "
                   "published, estimated and leave-one-model-out figures")
    e.add_argument("--write", action="store_true",
                   help="with --fit-published: write the fitted numbers into the target's TOML when "
                   "leave-one-model-out beats the current ones")
    e.add_argument("--json", action="store_true", help="print the results as JSON")
    return parser


FLEET_EXAMPLES = """\
examples:
  edgekit fleet examples/fleet/matrix.toml
  edgekit fleet matrix.toml --address auto --out /shared/fleet --cache /shared/edgekit-cache

a matrix file:
  [build]                      # flags of every cell (edgekit build's long names)
  effort = "fast"
  [[models]]                   # one entry per model, with its own flags
  model = "mobilenet_v2"
  [matrix]                     # every combination, for each model
  target = ["raspberry-pi-5", "jetson", "x86-64"]
  precision = ["fp16", "int8"]

exit codes: the highest of the cells'   0 all built and verified   1 a gate failed
  2 bad input (the matrix, or a cell's)   3 a stage failed
"""


ESTIMATE_EXAMPLES = """\
examples:
  edgekit estimate dist/mobilenet_v2-jetson-orin-nano --target jetson
  edgekit estimate dist/*/model.onnx --validate --threads 2
  edgekit estimate --calibrate-host my-host.toml --threads 2   # then: edgekit build ... --target my-host.toml
  edgekit estimate --fit-published jetson-agx-orin              # the device model against published latencies

every figure is labelled: `estimated` from the device model, `measured: host` from a run here.
"""


def build_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """`edgekit.build`'s keyword arguments from parsed `edgekit build` arguments (`edgekit fleet` runs its cells
    through this too, so a cell is exactly the command line it prints)."""
    return dict(
        model=args.model, target=args.target, calib=args.calib, eval=args.eval, train=args.train, recipe=args.recipe,
        precision=args.precision, format=args.format, arch=args.arch, num_classes=args.num_classes,
        input_size=args.input_size, out=args.out, use_cache=not args.no_cache, quiet=args.quiet, effort=args.effort,
        device_url=args.device, device_token=args.device_token, ray=args.ray,
        overrides={
            "export.opset": args.opset, "quantize.max_float_layers": args.max_float_layers,
            "quantize.int8_mode": args.int8_mode, "prune.ratio": args.prune, "search.budget": args.budget,
            "distill.steps": args.distill_steps,
            "verify.runs": args.runs, "verify.threads": args.threads,
            "verify.eval_limit": args.eval_limit, "seed": args.seed, "gates.max_top1_drop_pt": args.max_top1_drop,
            "gates.min_top1_agreement": args.min_agreement, "gates.max_size_mb": args.max_size_mb,
            "gates.max_latency_ms": args.max_latency_ms, "gates.max_ppl_ratio": args.max_ppl_ratio,
            "weights.method": args.method, "weights.group_size": args.group_size, "lowrank.rank": args.eora_rank,
        },
    )


def parse_build(argv: list[str]) -> argparse.Namespace:
    """`edgekit build ARGV...` parsed as the command parses it; bad arguments raise UsageError, without the usage
    block a person typing the command gets (a fleet names the file and the cell instead)."""
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        return _parser().parse_args(["build", *argv])


def _build(args: argparse.Namespace) -> int:
    from edgekit.api import build

    return _finish(build(**build_arguments(args)), args.json)


def latency_texts(report: dict[str, Any]) -> tuple[str, str]:
    """The host's measured and the target's estimated speed, as the one-line summary shows them."""
    host, est = report["latency_ms"]["measured_host"], report["latency_ms"]["estimated_target"]
    if "tokens_per_s" in host:  # a language model: speed is tokens per second
        return (f"{host['tokens_per_s']:.1f} tok/s",
                f"{est['tokens_per_s']:.1f} tok/s ({est['decode_bound']}-bound)" if est.get("ms") else "n/a")
    return (f"p50 {host['p50']:.2f} ms",
            f"{est['ms']:.2f} ms ({est['bound']}-bound)" if est.get("ms") is not None else "n/a")


def gate_failures(failed: list[dict[str, Any]]) -> str:
    """Failed gates in one line: name, value, limit and what the value was measured on."""
    return "; ".join(f"{g['name']} {g['value']:.4g} vs limit {g['limit']:g} ({g['basis']})" for g in failed)


def _finish(result: Any, as_json: bool) -> int:
    """Print a build's one-line summary (or its report) and any failed gate; the exit code."""
    report = result.report
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        host_text, est_text = latency_texts(report)
        print(f"{result.out}/{report['artifact']['file']}  {report['artifact']['precision']}  "
              f"{report['size_bytes'] / 1e6:.2f} MB  {report['accuracy']['summary']}  "
              f"host {host_text} (measured)  {report['target']['name']} {est_text} (estimated)")
        if report.get("device"):
            on_device = report["device"]
            latency = on_device["latency_ms"]
            speed = (f"decode {latency['tokens_per_s']} tok/s" if latency.get("tokens_per_s") else
                     f"{latency.get('part', '')} p50 {latency['p50']:.2f} ms".lstrip())
            print(f"on {on_device['name']}: {on_device['accuracy']['summary']}  {speed} ({latency['label']}, "
                  f"{on_device['runtime']})")
    if result.failed_gates:
        print(f"edgekit: gate failed: {gate_failures(result.failed_gates)}", file=sys.stderr)
    return result.exit_code


def _fleet(args: argparse.Namespace) -> int:
    from edgekit.api import fleet

    summary = fleet(args.matrix, out=args.out, address=args.address, cache=args.cache, quiet=args.quiet)
    if args.json:
        print(json.dumps(summary, indent=2))
        return int(summary["exit_code"])
    from rich.table import Table

    from edgekit.fleet import COLUMNS, table_rows

    table = Table(*(title for _, title in COLUMNS), title=f"edgekit fleet: {len(summary['cells'])} cells, "
                  f"{summary['seconds']:.0f} s on Ray ({summary['ray']})")
    for texts in table_rows(summary):
        table.add_row(*texts)
    _console().print(table)
    for row in summary["cells"]:
        if row["exit_code"]:
            print(f"{row['cell']}: {row['reason']}\n  alone: {row['command']}")
    print(f"wrote {summary['out']}/fleet.json and {summary['out']}/index.html (each cell's folder under "
          f"{summary['out']}/)")
    return int(summary["exit_code"])


def _verify(args: argparse.Namespace) -> int:
    from edgekit.api import verify

    return _finish(verify(args.artifact, args.device, device_token=args.device_token, quiet=args.quiet), args.json)


def _report(args: argparse.Namespace) -> int:
    from edgekit.api import report

    print(f"wrote {report(args.folder)}")
    return 0


def _diff(args: argparse.Namespace) -> int:
    from edgekit.api import diff

    if args.images < 1:
        raise UsageError("--images must be at least 1")
    found = diff(args.folder, images=args.images, quiet=args.quiet, device_url=args.device,
                 device_token=args.device_token)
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    first, worst = found["first_departure"], found["worst"]
    print(f"{'layer':<40}{'module':<24}{'shape':<20}{'rel error':>11}{'cosine':>10}")
    for row in found["rows"]:
        marks = [name for name, layer in (("first departure", first), ("worst", worst)) if row["layer"] == layer]
        mark = f" <- {', '.join(marks)}" if marks else ""
        print(f"{row['layer']:<40}{row['module']:<24}{'x'.join(map(str, row['shape'])):<20}"
              f"{row['rel_error']:>11.4g}{row['cosine']:>10.5f}{mark}")
    print(f"{found['layers']} layers on {found['images']} held-out images, the artifact run on {found['ran_on']}; "
          f"first departure (relative error >= "
          f"{found['departs_at']}): {first or 'none'}; worst: {worst}")
    return 0


def _agent(args: argparse.Namespace) -> int:
    from edgekit.agent.launch import serve

    serve(args.host, args.port, token=args.token, token_file=args.token_file, tls_cert=args.tls_cert,
          tls_key=args.tls_key, name=args.name, max_mb=args.max_mb, memory_mb=args.memory_mb, queue_size=args.queue,
          job_timeout=args.job_timeout, request_timeout=args.request_timeout, max_connections=args.max_connections,
          quiet=args.quiet, emulated=args.emulated)
    return 0


def _console() -> Any:
    """Tables as wide as they need when stdout is a file or a pipe, not the 80 columns rich assumes."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)


def _targets(args: argparse.Namespace) -> int:
    from edgekit.targets import builtin_targets

    targets = builtin_targets()
    if args.json:
        print(json.dumps([t.model_dump() for t in targets], indent=2))
        return 0
    from rich.table import Table

    table = Table("target", "aliases", "kind", "runtimes (preferred first)", "fp32 GF", "fp16 GF", "int8 GOPS",
                  "GB/s", "RAM MB", "default", "held to published", title="edgekit targets",
                  caption="held to published: public latencies the device model was fitted to, its median error on "
                          "them and, in brackets, leaving each model out; '-': no public latency checks it "
                          "(each profile's \\[sources] says where its numbers come from)")

    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:g}"

    for t in targets:
        runtimes = ", ".join(f"{r.name} ({r.format})" for r in t.runtimes)
        fmt = t.default("classifier", "format") or t.runtimes[0].format
        default = f"{t.default('classifier', 'precision') or 'fp32'} {fmt}"
        table.add_row(t.name, ", ".join(t.aliases), t.kind, runtimes, num(t.compute.fp32_gflops),
                      num(t.compute.fp16_gflops), num(t.compute.int8_gops), num(t.memory.bandwidth_gbps),
                      num(t.memory.ram_mb), default, _held_to_published(t))
    _console().print(table)
    return 0


def _held_to_published(target: Target) -> str:
    held = target.published
    if held is None:
        return "-"
    left_out = "" if held.held_out_median_error is None else f" ({held.held_out_median_error * 100:.0f}%)"
    return f"{held.rows} rows: {held.median_error * 100:.0f}%{left_out}"


def _inspect(args: argparse.Namespace) -> int:
    from edgekit.api import inspect

    analysis = inspect(args.model, arch=args.arch, num_classes=args.num_classes, input_size=args.input_size)
    if args.json:
        print(json.dumps(analysis, indent=2))
        return 0
    if analysis["family"] == "llm":
        print(f"{analysis['model']}  {analysis['architecture']}  {analysis['params'] / 1e6:.1f} M params  "
              f"{analysis['layers']} blocks  hidden {analysis['hidden_size']}  heads {analysis['heads']} "
              f"(key/value {analysis['kv_heads']})  vocab {analysis['vocab_size']}  "
              f"fp32 weights {analysis['weight_bytes_fp32'] / 1e6:.1f} MB")
        return 0
    from rich.table import Table

    layers = sorted(analysis["layers"], key=lambda layer: -layer["macs"])
    shown = layers if args.top == 0 else layers[: args.top]
    table = Table("layer", "op", "MMACs", "params", "output", title=(
        f"{analysis['model']}  {analysis['params'] / 1e6:.3f} M params  {analysis['macs'] / 1e6:.1f} M MACs  "
        f"weights {analysis['weight_bytes'] / 1e6:.2f} MB  "
        f"activation peak {analysis['activation_peak_bytes'] / 1e6:.2f} MB"
    ))
    for layer in shown:
        table.add_row(layer["name"], layer["op"], f"{layer['macs'] / 1e6:.2f}", str(layer["params"]),
                      "x".join(map(str, layer["output_shape"])))
    _console().print(table)
    if len(shown) < len(layers):
        print(f"({len(layers) - len(shown)} more layers; --top 0 lists all)")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from edgekit.api import generate

    if args.tokens < 1:
        raise UsageError("--tokens must be at least 1")
    result = generate(args.artifact, args.prompt, args.tokens, args.threads)
    print(args.prompt + result["text"])
    print(f"({len(result['tokens'])} tokens; prefill {result['prefill_ms']:.1f} ms, decode "
          f"{result['tokens_per_s']:.1f} tokens/s, measured here: {result['runtime']})", file=sys.stderr)
    return 0


def _estimate(args: argparse.Namespace) -> int:
    from edgekit.api import estimate

    if args.fit_published:
        return _fit_published(args)
    if args.write:
        raise UsageError("--write goes with --fit-published TARGET")
    results = estimate(args.artifacts, args.target, validate=args.validate, calibrate_host=args.calibrate_host,
                       threads=args.threads, recalibrate=args.recalibrate, top=args.top, quiet=args.json)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    from rich.table import Table

    if "profile" in results:
        print(f"wrote {results['profile']}: {results['profile_description']}")
    for row in results.get("estimates", []):
        table = Table("layer", "op", "class", "precision", "ms", "bound", title=(
            f"{row['artifact']} on {row['target']}: {row['ms']:.3f} ms (estimated, {row['bound']}-bound, "
            f"{row['ops']} ops)"))
        for layer in row["layers"]:
            table.add_row(layer["name"], layer["op"], layer["class"], layer["precision"], f"{layer['ms']:.4f}",
                          layer["bound"])
        _console().print(table)
    if "validation" in results:
        report = results["validation"]
        table = Table("artifact", "format", "estimated ms", "measured ms (host)", "error", title=(
            f"device model vs measurement: {report['host']}, {report['threads']} threads"))
        for row in report["models"]:
            table.add_row(row["artifact"], row["format"], f"{row['estimated_ms']:.3f}", f"{row['measured_ms']:.3f}",
                          f"{row['error'] * 100:+.1f}%")
        _console().print(table)
        print(f"median absolute error: {report['median_abs_error'] * 100:.1f}% over {len(report['models'])} artifacts")
    return 0


def _fit_published(args: argparse.Namespace) -> int:
    from edgekit.api import fit_published

    if args.artifacts or args.validate or args.calibrate_host:
        raise UsageError("--fit-published takes no artifacts, --validate or --calibrate-host")
    result = fit_published(args.fit_published, write=args.write, quiet=args.json)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    from rich.table import Table

    table = Table("model", "precision", "runtime", "input", "published ms", "estimate before", "after fit",
                  "left out: estimate / published", title=f"{result['target']}: {result['label']}")
    for row in result["rows"]:
        ratio = "-" if row["held_out_ratio"] is None else f"{row['held_out_ms']:.3f} ({row['held_out_ratio']:.2f}x)"
        table.add_row(row["model"], row["precision"], row["runtime"], str(row["input"]), f"{row['published_ms']:g}",
                      f"{row['before_ms']:.3f}", f"{row['after_ms']:.3f}", ratio)
    _console().print(table)
    percent = {key: "-" if result[key] is None else f"{result[key] * 100:.0f}%" for key in
               ("median_error_before", "median_error_after", "held_out_median_error")}
    print(f"median absolute error: {percent['median_error_before']} with the current numbers, "
          f"{percent['median_error_after']} fitted to all rows, {percent['held_out_median_error']} "
          f"leave-one-model-out ({len(result['rows'])} rows, {len(result['models'])} models)")
    print("fitted: " + ", ".join(f"{key} {result['current'][key]:g} -> {value:g}"
                                 for key, value in result["fitted"].items()))
    if "written" in result:
        print(f"wrote {result['written']}" if result["written"] else f"not written: {result['not_written']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        commands = {"build": _build, "fleet": _fleet, "verify": _verify, "report": _report, "diff": _diff,
                    "agent": _agent, "targets": _targets, "inspect": _inspect, "estimate": _estimate,
                    "generate": _generate}
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("edgekit: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get("EDGEKIT_DEBUG"):
            traceback.print_exc()
        code, reason = failure(err)
        print(f"edgekit: {reason}", file=sys.stderr)
        return code


def failure(err: Exception) -> tuple[int, str]:
    """An error's exit code and one-line reason: edgekit's own say theirs; anything else is a defect of edgekit's,
    not bad input (exit 3, the traceback on request)."""
    if isinstance(err, EdgekitError):
        return err.exit_code, str(err)
    return StageError.exit_code, (f"unexpected {type(err).__name__}: {first_line(err)} (EDGEKIT_DEBUG=1 shows the "
                                  "traceback)")

