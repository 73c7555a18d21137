"""``python -m clip_refine_lab.sweep SPEC.yaml``: the same as ``clip-refine-lab sweep SPEC.yaml``."""

import sys

from .cli import main

sys.exit(main())
