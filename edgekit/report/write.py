"""Write the report files and publish the artifact folder atomically.

A build writes into a hidden sibling folder and renames it into place only at the end, so a
folder at the final path is always complete; a failed build leaves nothing that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from edgekit.errors import UsageError


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def staging_folder(out: Path) -> Path:
    """A fresh hidden folder beside `out`; refuses to later replace a non-empty folder edgekit did not write."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").exists())):
        raise UsageError(f"{out} exists and is not an edgekit artifact folder; choose another --out")
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def publish(staging: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
