"""The embedded default data and base model: a generated image-caption world and a tiny CLIP pre-trained on it.

:mod:`.base` holds the entry points (``ensure_world``, ``ensure_base``, ``resolve_pretrained``,
``world_manifest``); :mod:`.world` builds the world from :mod:`.vocabulary`, :mod:`.scenes`,
:mod:`.rendering`, :mod:`.captions` and :mod:`.tasks`; :mod:`.pretrain` trains the base.
"""
