"""clip-refine-lab: post-pre-train CLIP models to close their modality gap (CLIP-Refine) and measure what changed.

Entry points: :func:`clip_refine_lab.train.refine` with a :class:`clip_refine_lab.config.RunConfig`,
:func:`clip_refine_lab.evaluate.evaluate_run` / :func:`~clip_refine_lab.evaluate.compare`, the CLI
``clip-refine-lab``, and the notebooks in ``notebooks/``.
"""

__version__ = "0.1.0"
