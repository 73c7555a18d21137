"""clip-refine-lab: post-pre-train CLIP models to close their modality gap (CLIP-Refine) and measure what changed.

The public API, importable from the package itself::

    import clip_refine_lab as crl

    run_dir = crl.refine(crl.RunConfig(method="clip-refine", alpha=0.5))
    print(crl.format_tables(crl.evaluate_run(run_dir)))

Names are loaded on first use, so ``import clip_refine_lab.losses`` stays light (no plotting or
notebook stack). The layers and where each concept lives: docs/architecture.md.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_PUBLIC = {
    "RunConfig": "clip_refine_lab.config",
    "ConfigError": "clip_refine_lab.config",
    "refine": "clip_refine_lab.training.loop",
    "load_model": "clip_refine_lab.models.loading",
    "reload_spec": "clip_refine_lab.models.loading",
    "export_open_clip_dir": "clip_refine_lab.models.loading",
    "ensure_world": "clip_refine_lab.embedded.base",
    "ensure_base": "clip_refine_lab.embedded.base",
    "evaluate_run": "clip_refine_lab.evaluation.evaluate",
    "evaluate_model": "clip_refine_lab.evaluation.evaluate",
    "evaluate_pretrained": "clip_refine_lab.evaluation.evaluate",
    "compare": "clip_refine_lab.evaluation.compare",
    "format_tables": "clip_refine_lab.evaluation.compare",
    "load_suite": "clip_refine_lab.evaluation.suites",
    "run_sweep": "clip_refine_lab.sweep.runner",
    "load_manifest": "clip_refine_lab.data.manifest",
    "dataset_features": "clip_refine_lab.features",
    "register_method": "clip_refine_lab.methods",
    "read_log": "clip_refine_lab.rundir",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'clip_refine_lab' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
