"""Test-wide settings: offline hub, the micro preset, and a cache dir private to this test session."""

import os
import tempfile

# Before anything imports huggingface_hub: an uncached pretrained tag must fail fast, not retry.
os.environ["HF_HUB_OFFLINE"] = "1"
# Tests run on the micro preset (tiny world and model) unless told otherwise.
os.environ.setdefault("CLIP_REFINE_LAB_PRESET", "micro")
# A private cache per session (set CLIP_REFINE_LAB_TEST_CACHE to reuse one across sessions).
os.environ["CLIP_REFINE_LAB_CACHE"] = os.environ.get("CLIP_REFINE_LAB_TEST_CACHE") or tempfile.mkdtemp(prefix="crl-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def micro_world():
    from clip_refine_lab.world import WorldConfig, build_world

    return build_world(WorldConfig.preset("micro"), progress=False)


@pytest.fixture(scope="session")
def micro_base(micro_world):
    """Path of the micro base checkpoint (pre-trained once per session)."""
    from clip_refine_lab.pretrain import pretrain_base

    return pretrain_base(world_preset="micro", progress=False)
