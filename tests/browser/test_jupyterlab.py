"""A real browser runs the notebooks in JupyterLab and sees their plots and widgets.

JupyterLab is served on 127.0.0.1 only, on a free port, with a random token, from a temporary folder
holding copies of the notebooks (so nothing is saved into notebooks/ and runs go to that folder).
Headless Chromium (Debian's package, /usr/bin/chromium; never a downloaded build) is driven by
Playwright. For 02_refine.ipynb: Run > Run All Cells, wait for every cell to finish, check that the live
plotly plot and the ipywidgets form (alpha slider, Run button) rendered, press Run in the form and wait
for its run. Then every other notebook of the tour: Run All Cells, no failed cell, a plotly plot (and
its widget) rendered. Screenshots go to $CLIP_REFINE_LAB_ARTIFACTS (default tests/browser/artifacts/).

Skipped unless CLIP_REFINE_LAB_BROWSER_TEST=1 (set by .ci/browser.sh, which installs what it needs).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("CLIP_REFINE_LAB_BROWSER_TEST") != "1",
                                reason="browser test: run .ci/browser.sh (sets CLIP_REFINE_LAB_BROWSER_TEST=1)")

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CLIP_REFINE_LAB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
RUN_TIMEOUT_S = float(os.environ.get("CLIP_REFINE_LAB_BROWSER_TIMEOUT", "600"))
# 02 first (it makes the run the others show), then the rest of the tour
NOTEBOOKS = ["02_refine.ipynb", "01_setup.ipynb", "03_zero_shot.ipynb", "04_retrieval.ipynb", "05_geometry.ipynb",
             "06_projections.ipynb", "07_failure_gallery.ipynb"]
# a widget each notebook must show (the ipywidgets classes our widgets add)
WIDGET_OF = {"03_zero_shot.ipynb": ".crl-run-picker", "06_projections.ipynb": ".crl-projection-explorer"}


def artifacts_dir() -> Path:
    d = Path(os.environ.get("CLIP_REFINE_LAB_ARTIFACTS") or ROOT / "tests" / "browser" / "artifacts")
    d.mkdir(parents=True, exist_ok=True)
    return d


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """(base url, token, folder) of a JupyterLab serving copies of the notebooks on 127.0.0.1."""
    work = tmp_path_factory.mktemp("lab")
    for nb in NOTEBOOKS:
        shutil.copy(ROOT / "notebooks" / nb, work / nb)
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("CLIP_REFINE_LAB_PRESET", "micro")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("CLIP_REFINE_LAB_CACHE", str(tmp_path_factory.mktemp("cache")))
    env["CLIP_REFINE_LAB_OUTPUT_ROOT"] = str(work)  # runs (and exported figures) go to <work>/runs
    env.pop("CLIP_REFINE_LAB_PROGRESS", None)  # JupyterLab decides: widget bars and the live plot
    env["JUPYTER_RUNTIME_DIR"] = str(work / ".runtime")
    settings = work / ".settings" / "@jupyterlab"
    for plugin, text in (("apputils-extension/notification", '{"fetchNews": "false", "checkForUpdates": false}'),
                         ("notebook-extension/tracker", '{"autoStartDefaultKernel": true}')):
        path = settings / f"{plugin}.jupyterlab-settings"  # no news pop-up; no kernel dialog
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    log = open(artifacts_dir() / "jupyterlab.log", "w")
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
           f"--port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={work}", f"--LabApp.workspaces_dir={work / '.workspaces'}",
           f"--LabApp.user_settings_dir={work / '.settings'}",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {proc.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"jupyter lab did not answer on {url} within 90 s; see {log.name}")
            time.sleep(0.5)
        yield url, token, work
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def wait_until_done(page, timeout_s: float) -> None:
    """Wait until every code cell has run: numbered prompts, none '[*]', the kernel idle."""
    page.wait_for_function(
        """() => {
            const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')]
                .map(p => p.textContent.trim());
            const status = document.querySelector('.jp-Notebook-ExecutionIndicator');
            const idle = !status || status.getAttribute('data-status') === 'idle';
            return prompts.length > 0 && prompts.every(t => /^\\[\\d+\\]:$/.test(t)) && idle;
        }""",
        timeout=timeout_s * 1000, polling=1000)


def shutdown_kernels(url: str, token: str) -> None:
    """Stop every kernel of the server (one notebook at a time keeps memory low)."""
    import json

    with urllib.request.urlopen(f"{url}/api/kernels?token={token}", timeout=10) as r:
        kernels = json.load(r)
    for k in kernels:
        req = urllib.request.Request(f"{url}/api/kernels/{k['id']}?token={token}", method="DELETE")
        urllib.request.urlopen(req, timeout=30).close()


def open_and_run_all(page, url: str, token: str, name: str, shot: Path) -> float:
    """Open a notebook, Run > Run All Cells, wait until every cell ran; screenshot; seconds taken."""
    # a workspace of its own, reset: only this notebook opens (not every one opened before)
    workspace = name.removesuffix(".ipynb").replace("_", "-")
    page.goto(f"{url}/lab/workspaces/{workspace}/tree/{name}?token={token}&reset", wait_until="domcontentloaded")
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=120_000)
    # JupyterLab may still ask which kernel to start: take the notebook's own (python3)
    dialog = page.locator(".jp-Dialog", has_text="Select Kernel")
    try:
        dialog.wait_for(state="visible", timeout=5_000)
        dialog.locator("button.jp-mod-accept").click()
    except Exception:  # no dialog: the kernel starts by itself
        pass
    # the kernel has started when the indicator says idle
    page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]', timeout=120_000)
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    t0 = time.monotonic()
    try:
        wait_until_done(page, RUN_TIMEOUT_S)
    finally:
        page.screenshot(path=str(shot))
    return time.monotonic() - t0


def assert_no_failed_cell(page, name: str) -> None:
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    tracebacks = [t for t in errors.all_inner_texts() if "Traceback" in t or "Error" in t]
    assert not tracebacks, f"{name}: a cell failed:\n{tracebacks[0][:3000]}"


def test_refine_notebook_runs_in_jupyterlab(lab):
    from playwright.sync_api import sync_playwright

    url, token, work = lab
    out = artifacts_dir()
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: apt-get install -y chromium (or set CLIP_REFINE_LAB_CHROMIUM)")
    console: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            took = open_and_run_all(page, url, token, "02_refine.ipynb", out / "jupyterlab-02_refine-run-all.png")
            print(f"Run All Cells finished in {took:.0f} s")
            assert_no_failed_cell(page, "02_refine.ipynb")
            assert page.locator(".jp-RenderedText", has_text="run directory:").count() >= 1

            # the live plot (a plotly FigureWidget) rendered
            plot = page.locator(".js-plotly-plot").first
            plot.wait_for(state="attached", timeout=60_000)
            plot.scroll_into_view_if_needed()
            assert page.locator(".js-plotly-plot .scatterlayer .trace").count() >= 2
            page.screenshot(path=str(out / "jupyterlab-02_refine-plot.png"))

            # the form: alpha slider and Run button
            form = page.locator(".crl-refine-form").first
            form.wait_for(state="visible", timeout=60_000)
            form.scroll_into_view_if_needed()
            assert form.locator(".widget-slider, .jupyter-widget-slider, .widget-hslider").count() >= 1
            assert "alpha" in form.inner_text()
            run_button = form.locator("button", has_text="Run").first
            assert run_button.is_visible()
            page.screenshot(path=str(out / "jupyterlab-02_refine-form.png"))

            # press Run: a second run with the form's values, with its own live plot in the form
            run_button.click()
            form.locator(".widget-html", has_text="finished:").first.wait_for(timeout=RUN_TIMEOUT_S * 1000)
            assert form.locator(".js-plotly-plot").count() >= 1
            form.scroll_into_view_if_needed()
            page.screenshot(path=str(out / "jupyterlab-02_refine-form-run.png"))
            runs = sorted(p.parent.name for p in (work / "runs").glob("*/summary.json"))
            assert len(runs) == 2, runs
        finally:
            (out / "browser-console.log").write_text("\n".join(console) + "\n")
            browser.close()
            shutdown_kernels(url, token)


@pytest.mark.parametrize("name", NOTEBOOKS[1:])
def test_tour_notebook_runs_in_jupyterlab(lab, name):
    """Every other notebook of the tour runs in JupyterLab too, its plotly figures and widgets rendered."""
    from playwright.sync_api import sync_playwright

    url, token, work = lab
    stem = name.removesuffix(".ipynb")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            took = open_and_run_all(page, url, token, name, artifacts_dir() / f"jupyterlab-{stem}.png")
            print(f"{name}: Run All Cells finished in {took:.0f} s")
            assert_no_failed_cell(page, name)
            plot = page.locator(".js-plotly-plot").first
            plot.wait_for(state="attached", timeout=60_000)  # static figures: plotly's JupyterLab extension
            if name in WIDGET_OF:
                widget = page.locator(WIDGET_OF[name]).first
                widget.wait_for(state="attached", timeout=60_000)
                widget.scroll_into_view_if_needed()
                page.screenshot(path=str(artifacts_dir() / f"jupyterlab-{stem}-widget.png"))
        finally:
            browser.close()
            shutdown_kernels(url, token)
