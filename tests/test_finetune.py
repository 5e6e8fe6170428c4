"""A labelled fine-tune (`--train`) after compression: trained on class folders, kept only where the held-out last
batch of them says it helped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edgekit import build
from edgekit.errors import UsageError

from .conftest import TinyNet, settle_batchnorm

FAST = {"verify.runs": 3, "verify.warmup": 1, "prune.ratio": 0.3, "finetune.batch": 4, "finetune.steps": 15}


def test_labels_train_a_classifier_and_a_fine_tune_the_held_out_batch_refutes_is_undone() -> None:
    from edgekit.passes.distill import distill

    torch.manual_seed(0)
    inputs = torch.randn(24, 6)
    rule = (inputs[:, 0] > 0).long().numpy()  # separable by the first feature
    refuted = rule.copy()
    refuted[-4:] = 1 - refuted[-4:]  # the held-out last batch says the opposite of what training teaches
    start = torch.nn.Linear(6, 2).state_dict()
    outcome = {}
    for name, labels in (("rule", rule), ("refuted", refuted)):
        model = torch.nn.Linear(6, 2)
        model.load_state_dict(start)
        targets = torch.as_tensor(labels)
        done = distill(model, torch.nn.Identity(), inputs, lambda m, x: [m(x)],
                       labels=lambda rows, y=targets: [y[rows]], steps=40, seconds=60, lr=1e-2, batch=4, seed=0,
                       progress=lambda xs, _n: xs, loss=lambda s, y: torch.nn.functional.cross_entropy(s[0], y[0]))
        assert done["probe_held_out"] and done["samples"] == 20
        outcome[name] = (done, {k: v.clone() for k, v in model.state_dict().items()})
    kept, undone = outcome["rule"][0], outcome["refuted"][0]
    assert not kept["reverted"] and kept["probe_loss_after"] < kept["probe_loss_before"]
    assert undone["reverted"] and undone["probe_loss_after"] > undone["probe_loss_before"]
    assert all(torch.equal(v, start[k]) for k, v in outcome["refuted"][1].items())


def judged_worse(done: dict) -> bool:
    """A fine-tune is undone when the task metric on the held-out rows fell, or stayed and the loss there rose."""
    before, after = done["probe_score_before"], done["probe_score_after"]
    return after < before or (after == before and done["probe_loss_after"] > done["probe_loss_before"])


def test_a_task_metric_that_falls_undoes_training_that_lowered_the_loss() -> None:
    from edgekit.passes.distill import distill

    torch.manual_seed(0)
    inputs = torch.randn(24, 6)
    labels = (inputs[:, 0] > 0).long()
    model = torch.nn.Linear(6, 2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    done = distill(model, torch.nn.Identity(), inputs, lambda m, x: [m(x)], labels=lambda rows: [labels[rows]],
                   steps=40, seconds=60, lr=1e-2, batch=4, seed=0, progress=lambda xs, _n: xs,
                   loss=lambda s, y: torch.nn.functional.cross_entropy(s[0], y[0]), probe_size=8,
                   judge=lambda rows: -float(model.weight.abs().sum()))  # a "metric" that training can only lower
    assert done["probe_size"] == 8 and done["samples"] == 16
    assert done["probe_loss_after"] < done["probe_loss_before"]  # the loss says it helped ...
    assert done["probe_score_after"] < done["probe_score_before"] and done["reverted"]  # ... the metric says not
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())


def test_a_pruned_classifier_is_fine_tuned_on_its_labels(photos: Path, labelled: Path) -> None:
    torch.manual_seed(0)
    model = settle_batchnorm(TinyNet(), 32)
    plain = build(model, "x86-64", calib=photos, eval=labelled, input_size=32, out="plain", quiet=True,
                  overrides=FAST)
    tuned = build(model, "x86-64", calib=photos, eval=labelled, train=labelled, input_size=32, out="tuned",
                  quiet=True, overrides=FAST)
    done = tuned.report["finetune"]
    assert done["images"] == 9 and done["labels"] == "class folders (sorted names)" and done["steps"] == 15
    assert done["probe_held_out"] and done["samples"] == 5 and done["probe_size"] == 4  # a batch, or a quarter
    assert 0 <= done["probe_score_before"] <= 1 and done["reverted"] == judged_worse(done)
    changed = tuned.report["artifact"]["sha256"] != plain.report["artifact"]["sha256"]
    assert changed == (not done["reverted"])  # kept: other weights; reverted: the pruned model as it was
    manifest = json.loads((tuned.out / "manifest.json").read_text())
    assert manifest["inputs"]["train"]["files"] == 9 and len(manifest["inputs"]["train"]["sha256"]) == 64
    assert [s["name"] for s in tuned.report["stages"]][:4] == ["load", "data", "prune", "finetune"]


@pytest.mark.parametrize("overrides, message", [
    ({"prune.ratio": 0.0}, "fine-tuning on --train recovers what pruning lost"),
    ({"finetune.batch": 5}, "a fine-tune needs at least 10"),
])
def test_a_fine_tune_it_cannot_judge_is_refused(photos: Path, labelled: Path, overrides: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        build(settle_batchnorm(TinyNet(), 32), "x86-64", calib=photos, eval=labelled, train=labelled, input_size=32,
              quiet=True, overrides={**FAST, **overrides})


def test_train_is_refused_where_the_family_does_not_take_it(tiny_lm_folder: Path, labelled: Path) -> None:
    with pytest.raises(UsageError, match="--train fine-tunes classifiers .* llm models do not take it yet"):
        build(tiny_lm_folder, "android-arm64", train=labelled, quiet=True)


def test_a_distillation_is_judged_by_agreement_with_the_original(photos: Path) -> None:
    torch.manual_seed(0)
    result = build(settle_batchnorm(TinyNet(), 32), "x86-64", calib=photos, eval=photos, input_size=32, quiet=True,
                   overrides={**FAST, "distill.steps": 10, "distill.batch": 2, "distill.lr": 1e-3})
    done = result.report["distillation"]
    assert done["probe_held_out"] and done["probe_size"] == max(2, (done["samples"] + done["probe_size"]) // 4)
    assert 0 <= done["probe_score_before"] <= 1  # top-1 agreement with the original on the held-out images
    assert done["reverted"] == judged_worse(done)
