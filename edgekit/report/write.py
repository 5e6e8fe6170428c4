"""Write the report files and publish the artifact folder atomically.

A build writes into a hidden sibling folder and renames it into place only at the end, so a
folder at the final path is always complete; a failed build leaves nothing that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from edgekit.errors import UsageError


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A fresh hidden folder beside `out`, renamed to `out` if the block succeeds and removed if it fails
    (with any parent folders it had to create). A non-empty folder edgekit did not write is never replaced."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").exists())):
        raise UsageError(f"{out} exists and is not an edgekit artifact folder; choose another --out")
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # innermost first
            with suppress(OSError):
                folder.rmdir()
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
