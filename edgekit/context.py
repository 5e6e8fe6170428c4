"""The build context: everything a build decided before its first long step, made once and passed along.

Steps read the plan (the resolved recipe), the target, the family adapter, the data the user named, the
cache, the progress display and the thread count from here, and add their report sections and notes to it,
instead of threading a dozen parameters through every call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgekit.cache import ArrayCache
    from edgekit.families.base import Family, LoadOptions
    from edgekit.progress import Progress
    from edgekit.recipe import Recipe
    from edgekit.runtimes.remote import RemoteDevice
    from edgekit.targets import Format, Int8Activations, Target


@dataclass
class BuildContext:
    plan: Recipe  # the resolved recipe: what runs
    origins: dict[str, str]  # dotted recipe key -> where its value came from (default, family, target, file, flag)
    target: Target
    adapter: Family
    options: LoadOptions
    calib: str | None  # the data the user named (None: the family's default)
    eval: str | None
    cache: ArrayCache
    progress: Progress
    threads: int  # host threads: the target's, capped by this host's cores
    remote: RemoteDevice | None = None  # the board's agent, when the artifact is also verified there
    train: str | None = None  # labelled images to fine-tune on after compression (families that train on labels)
    recipe_file: Path | None = None
    ray: str | None = None  # a Ray address a budget search scores its candidates on (None: in this process)
    staging: Path | None = None  # the folder being written (renamed into place when the build completes)
    notes: list[str] = field(default_factory=list)
    sections: dict[str, Any] = field(default_factory=dict)  # report sections the steps add (pruning, search, …)

    # what resolve() always sets, typed as set
    @property
    def format(self) -> Format:
        assert self.plan.export.format is not None
        return self.plan.export.format

    @property
    def precision(self) -> str:
        assert self.plan.quantize.precision is not None
        return self.plan.quantize.precision

    @property
    def opset(self) -> int:
        assert self.plan.export.opset is not None
        return self.plan.export.opset

    @property
    def activations(self) -> Int8Activations:
        assert self.plan.quantize.activations is not None
        return self.plan.quantize.activations

    @property
    def target_threads(self) -> int:
        assert self.plan.verify.threads is not None
        return self.plan.verify.threads

    @property
    def runtime(self) -> str:
        """The runtime the target runs this build's format in."""
        runtime = self.target.runtime_for(self.format)
        assert runtime is not None, "resolve() admits only formats the target runs"
        return runtime.name
