"""Settings for every test, notebooks included (nbval kernels inherit this environment).

* HF_HUB_OFFLINE=1: an uncached pretrained tag fails fast instead of retrying the hub for ~50 s.
* CLIP_REFINE_LAB_PRESET=micro: tests and notebooks run on the micro world and model (seconds).
* CLIP_REFINE_LAB_CACHE: a private cache per test session, unless CLIP_REFINE_LAB_TEST_CACHE names
  one to reuse across sessions (faster local iteration).
* CLIP_REFINE_LAB_OUTPUT_ROOT: relative output folders (``runs/``) of notebooks and helpers go to a
  private temporary folder, so a test run leaves the working tree as it found it.
"""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("CLIP_REFINE_LAB_PRESET", "micro")
os.environ["CLIP_REFINE_LAB_CACHE"] = os.environ.get("CLIP_REFINE_LAB_TEST_CACHE") or tempfile.mkdtemp(
    prefix="crl-test-cache-")
os.environ["CLIP_REFINE_LAB_OUTPUT_ROOT"] = tempfile.mkdtemp(prefix="crl-test-runs-")
