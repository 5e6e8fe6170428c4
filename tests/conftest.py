"""Shared fixtures: tiny real-photo folders, tiny classifiers with meaningful BatchNorm statistics."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
PHOTOS = sorted((REPO / "calibration" / "images").glob("*.jpg"))
SHARED_DATA = REPO.parent / "shared" / "data"
VOCAB = 384  # tiny language models' vocabulary
AGENT_TOKEN = "test-token-0123"

if os.environ.get("PYTEST_XDIST_WORKER"):  # the suite's workers share the cores: one torch thread each
    torch.set_num_threads(1)


@pytest.fixture
def loopback_agent(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An `edgekit agent` named test-board on loopback, its URL, with its token in $EDGEKIT_AGENT_TOKEN."""
    from edgekit.agent.server import Agent

    server = Agent(("127.0.0.1", 0), AGENT_TOKEN, name="test-board", quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("EDGEKIT_AGENT_TOKEN", AGENT_TOKEN)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test builds in its own folder with its own cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """12 real photos (from the shipped calibration set) in a flat folder."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in PHOTOS[::8][:12]:
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture
def boxes(tmp_path: Path) -> Path:
    """Real photos in the YOLO layout (images/ and labels/) with a few boxes each."""
    root = tmp_path / "boxes"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for index, photo in enumerate(PHOTOS[:8]):
        shutil.copy(photo, root / "images" / photo.name)
        (root / "labels" / f"{photo.stem}.txt").write_text(f"{index % 3} 0.5 0.5 0.4 0.3\n1 0.25 0.3 0.2 0.2\n")
    return root


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    """A folder per class (3 classes, 3 photos each), the layout users label their own data with."""
    folder = tmp_path / "labelled"
    for index, path in enumerate(PHOTOS[1::11][:9]):
        class_dir = folder / f"class_{index % 3}"
        class_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, class_dir / path.name)
    return folder


class TinyNet(nn.Module):
    """Conv-BN-ReLU x2, pool, linear: a classifier small enough to export and verify in a second."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def settle_batchnorm(model: nn.Module, size: int) -> nn.Module:
    """Set BatchNorm statistics from real photos: random-init statistics make outputs input-independent."""
    from PIL import Image

    rows = []
    for path in PHOTOS[:16]:
        image = Image.open(path).convert("RGB").resize((size, size))
        rows.append((np.asarray(image, dtype=np.float32).transpose(2, 0, 1) - 127.0) / 64.0)
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.from_numpy(np.stack(rows)))
    return model.eval()


@pytest.fixture
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return settle_batchnorm(TinyNet(), 32)


class TinyBlocks(nn.Module):
    """A stem and three torchvision inverted residuals (one with a residual add, one strided): a classifier with
    search units, small enough to search and build in seconds."""

    def __init__(self, num_classes: int = 5) -> None:
        from torchvision.models.mobilenetv2 import InvertedResidual

        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
            InvertedResidual(8, 8, 1, 6), InvertedResidual(8, 16, 2, 6), InvertedResidual(16, 16, 1, 6),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@pytest.fixture
def tiny_blocks() -> nn.Module:
    torch.manual_seed(0)
    return settle_batchnorm(TinyBlocks(), 32)


@pytest.fixture
def mobilenet_v3_pth(tmp_path: Path) -> Path:
    """A 4-class torchvision mobilenet_v3_small state dict, as a user's fine-tuned checkpoint would be."""
    import torchvision

    torch.manual_seed(0)
    model = settle_batchnorm(torchvision.models.mobilenet_v3_small(num_classes=4), 64)
    path = tmp_path / "fish.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def instances(tmp_path: Path) -> Path:
    """Real photos in the YOLO-seg layout (images/ beside seg-labels/), one drawn polygon each."""
    root = tmp_path / "instances"
    (root / "images").mkdir(parents=True)
    (root / "seg-labels").mkdir()
    for photo in PHOTOS[:2]:
        (root / "images" / photo.name).symlink_to(photo)
        (root / "seg-labels" / f"{photo.stem}.txt").write_text("0 0.3 0.3 0.7 0.3 0.7 0.8 0.3 0.8\n")
    return root


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    """A small valid GGUF file (a header, metadata with a string array, two tensors), written by the gguf
    package's own writer."""
    import gguf

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(16)
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(8, 4))
    writer.add_tensor("output_norm.weight", np.ones(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_llama(seed: int = 0, tie: bool = True) -> torch.nn.Module:
    """A 2-block random Llama (grouped-query attention), small enough to quantize and export in a second."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=tie, attn_implementation="eager")
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_lm_folder(tmp_path: Path) -> Path:
    """A Hugging Face causal-LM folder: a tiny random Llama and a byte-level BPE tokenizer trained on real text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from edgekit.families import llm

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(llm.wiki_articles()[:20], trainer)
    folder = tmp_path / "tiny-llama"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", unk_token="<unk>").save_pretrained(folder)
    tiny_llama().save_pretrained(folder)
    return folder
