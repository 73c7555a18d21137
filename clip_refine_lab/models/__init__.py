"""CLIP models through open_clip: loading (:mod:`.loading`), checkpoints (:mod:`.checkpoints`) and the
speed options that keep a model's parameters and results (:mod:`.speed`).

This layer knows nothing of the embedded world: the ``"embedded"`` pretrained tag is resolved to a
checkpoint path by :mod:`clip_refine_lab.embedded.base` before it reaches :func:`.loading.load_model`.
"""
