"""Build (or find) the embedded world with every core: ``python benchmarks/build_world.py [--world micro]``.

The library builds it with 2 worker processes (``clip_refine_lab.embedded.base.ensure_world``); on a many-core
machine this is faster.
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", default="default", choices=("default", "micro"))
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = p.parse_args()
    from clip_refine_lab.embedded.world import WorldConfig, build_world

    t0 = time.time()
    world = build_world(WorldConfig.preset(args.world), progress=False, workers=args.workers)
    print(f"world {world.root} ready in {time.time() - t0:.0f} s")
