"""What notebooks 01, 05 and 09 show of a model's regime: the statistics beside real CLIP's, and two bases side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from ..config import preset_name
from ..embedded.pretrain import DEFAULT_BASES, base_recipe
from ..models.loading import LoadedModel

def regime_frame(columns: Mapping[str, dict]):
    """A DataFrame of :func:`~clip_refine_lab.regime.regime_rows`: one row per statistic, one column per model,
    and real CLIP ViT-B/32's published figures in the last column (blank where none is published)."""
    import pandas as pd

    from ..regime import regime_rows

    return pd.DataFrame(regime_rows(dict(columns))).set_index("statistic")


def comparison_bases(bases: Sequence[str] | None, preset: str | None = None) -> list[str]:
    """The bases notebook 09 compares: ``bases`` (each checked), or the preset's own base and the other regime
    (the default preset: converged and high-temperature; micro, whose base is high-temperature too: micro and
    converged)."""
    if bases is not None:
        for name in bases:
            base_recipe(name, preset)  # an unknown name fails here, listing the known ones
        return list(bases)
    own = DEFAULT_BASES[preset_name(preset)]
    return [own, "high-temperature" if own == "converged" else "converged"]


def load_bases(names: Sequence[str], preset: str | None = None, *, device: str = "cpu",
               progress: bool = True) -> dict[str, LoadedModel]:
    """Each named base of the preset's model, pre-trained first where it is not cached (it says how long)."""
    from ..embedded.base import ensure_base
    from ..models.loading import load_model

    return {name: load_model(str(ensure_base(world_preset=preset, base=name, progress=progress)), device=device)
            for name in names}


def caption_set(dataset: str | None, preset: str | None = None) -> Path:
    """The caption manifest notebook 09 measures on: a manifest file, or a split of the embedded world
    (default: synthetic-retrieval, where docs/results.md measures the geometry)."""
    from ..evaluation.suites import resolve_manifest
    from ..rundir import project_root

    try:  # a relative manifest path is taken from the repository root (notebooks run in notebooks/)
        return resolve_manifest(dataset or "synthetic-retrieval", preset, base=project_root())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"dataset: {e}") from None
