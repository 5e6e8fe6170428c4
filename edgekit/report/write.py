"""Write the report files and publish the artifact folder atomically, never over a folder edgekit did not write.

A build writes into a hidden sibling folder and renames it into place only at the end, so a folder
at the final path is always complete; a failed build leaves nothing that looks finished. Every
published folder carries a marker (`.edgekit`) listing the files edgekit put there: a later build
replaces a folder only if its marker is intact and it holds nothing the marker does not list, so a
user's folder, or a user's file dropped into an artifact folder, is never deleted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from edgekit.errors import UsageError

MARKER = ".edgekit"
_LEFTOVER = r"\.{name}\.(partial|replaced)-(\d+)"  # staging and replaced folders, named by their process


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_html(path: Path, report: dict[str, Any], manifest: dict[str, Any] | None) -> None:
    from edgekit.report.html import render

    path.write_text(render(report, manifest), encoding="utf-8")


def adopt(folder: Path, name: str) -> None:
    """List `name` in the marker of a folder edgekit published, so that a later build may still replace the folder;
    a folder without an intact marker is left as it is."""
    try:
        marker = json.loads((folder / MARKER).read_text())
        files = marker["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if isinstance(files, list) and name not in files:
        write_json(folder / MARKER, {**marker, "files": sorted([*files, name])})


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A fresh hidden folder beside `out`, marked and renamed to `out` if the block succeeds and removed if it
    fails (with any parent folders it had to create). Only an empty folder or one `replaceable` says edgekit
    wrote is replaced; leftovers of builds whose process is gone are removed first."""
    _check_replaceable(out)
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        _remove_leftovers(out)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    except OSError as err:
        raise UsageError(f"cannot write the artifact folder {out}: {err.strerror or err}") from None
    try:
        yield staging
        _mark(staging)
        _check_replaceable(out)  # again: the folder may have changed during the build
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # innermost first
            with suppress(OSError):
                folder.rmdir()
        raise


def replaceable(folder: Path) -> str | None:
    """Why `folder` must not be replaced, or None when it may: it is missing, empty, or marked by edgekit and
    holds only the files its marker lists."""
    if not folder.exists() and not folder.is_symlink():
        return None
    if folder.is_symlink() or not folder.is_dir():
        return "is not a folder"
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()}
    if not present and not any(folder.iterdir()):
        return None
    try:
        listed = json.loads((folder / MARKER).read_text())["files"]
        if not isinstance(listed, list):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        return "is not an edgekit artifact folder"
    unknown = sorted(present - set(listed) - {MARKER})
    if unknown:
        return f"holds files edgekit did not write ({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''})"
    return None


def _check_replaceable(out: Path) -> None:
    reason = replaceable(out)
    if reason:
        raise UsageError(f"{out} exists and {reason}: edgekit replaces only folders it wrote; choose another --out")


def _mark(staging: Path) -> None:
    files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    write_json(staging / MARKER, {"written_by": "edgekit", "files": files})


def _publish(staging: Path, out: Path) -> None:
    """Rename `staging` to `out`; a previous `out` is renamed aside first and removed after."""
    previous = out.parent / f".{out.name}.replaced-{os.getpid()}"
    if out.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(out, previous)
    os.replace(staging, out)
    shutil.rmtree(previous, ignore_errors=True)


def _remove_leftovers(out: Path) -> None:
    """Staging and replaced folders of `out` left by builds whose process no longer runs (killed, crashed). Only
    `out`'s own: beside it, on storage that several machines share (`edgekit fleet` on a cluster), other folders'
    builds may be running under process ids that mean nothing here."""
    if not out.parent.is_dir():
        return
    leftover = re.compile(_LEFTOVER.format(name=re.escape(out.name)))
    for entry in out.parent.iterdir():
        match = leftover.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _running(int(match[2])):
            shutil.rmtree(entry, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, ValueError):  # a number no process has
        return False
    return True
