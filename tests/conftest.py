"""Shared fixtures (environment settings are in the repository's root conftest.py)."""

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def micro_world():
    from clip_refine_lab.embedded.world import WorldConfig, build_world

    return build_world(WorldConfig.preset("micro"), progress=False)


@pytest.fixture(scope="session")
def micro_base(micro_world):
    """Path of the micro base checkpoint (pre-trained once per session)."""
    from clip_refine_lab.embedded.pretrain import pretrain_base

    return pretrain_base(world_preset="micro", progress=False)
