#!/usr/bin/env bash
# Real-browser test: JupyterLab on 127.0.0.1 runs notebooks/02_refine.ipynb in headless Chromium
# (Debian's package) driven by Playwright; screenshots go to $CLIP_REFINE_LAB_ARTIFACTS
# (default tests/browser/artifacts/). Installs what it needs; never downloads a browser build
# (no `playwright install`). Usage: bash .ci/browser.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/bin/chromium ]; then
    echo "installing Debian's chromium"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
python -c "import playwright" 2>/dev/null || pip install -q playwright
python -c "import anywidget" 2>/dev/null || pip install -q anywidget  # plotly FigureWidget (live plot)

export CLIP_REFINE_LAB_BROWSER_TEST=1
export CLIP_REFINE_LAB_PRESET="${CLIP_REFINE_LAB_PRESET:-micro}"
export HF_HUB_OFFLINE=1
export CLIP_REFINE_LAB_ARTIFACTS="${CLIP_REFINE_LAB_ARTIFACTS:-$PWD/tests/browser/artifacts}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$CLIP_REFINE_LAB_ARTIFACTS"
python -m pytest -q -p no:cacheprovider tests/browser/test_jupyterlab.py -rs "$@"
echo "screenshots: $CLIP_REFINE_LAB_ARTIFACTS"
