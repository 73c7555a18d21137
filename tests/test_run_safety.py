"""Run-directory safety on the micro preset: one process per run (lock), non-finite states never
checkpointed, corrupt checkpoints and full disks as one-line errors, output paths and run names
checked, papermill list parameters and ``--extra``."""

import errno
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from clip_refine_lab import cli, rundir, utils
from clip_refine_lab.config import ConfigError, RunConfig
from clip_refine_lab.rundir import RunInUseError, RunLock
from clip_refine_lab.training.loop import refine
from clip_refine_lab.training.state import NonFiniteLossError, UnreadableCheckpointError
from clip_refine_lab.ui import parameters

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def micro_config(tmp_path, **kw) -> RunConfig:
    values = dict(preset="micro", output_dir=str(tmp_path / "runs"), run_name="run", epochs=1, batch_size=32)
    values.update(kw)
    return RunConfig(**values)


def run_cli(*args, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clip_refine_lab.cli", "--quiet", *args], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The CLI's error: exit 2, one line on stderr, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith("clip-refine-lab: error: ")
    return lines[0]


def steps_of(run_dir: Path, kind: str) -> list[int]:
    return [r["step"] for r in rundir.read_log(run_dir, kind)]


# ------------------------------------------------------------------------------- one process per run
HOLDER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from clip_refine_lab.config import RunConfig
    from clip_refine_lab.training.loop import refine
    started, go, config = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

    def hold(record):  # stay inside the run after its first step until the test says go
        if record.get("kind") == "train" and record["step"] == 1:
            started.write_text(str(os.getpid()))
            t0 = time.time()
            while not go.exists() and time.time() - t0 < 180:
                time.sleep(0.05)

    refine(RunConfig.from_yaml(config), progress=False, callback=hold)
""")


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"holder exited early: {proc.stderr.read()[-3000:]}")
        if time.time() - t0 > timeout:
            raise AssertionError("holder never started training")
        time.sleep(0.1)


def test_second_process_on_the_same_run_is_refused_and_the_first_run_is_intact(tmp_path, micro_base):
    cfg = micro_config(tmp_path, run_name="shared", seed=0, val_every=2)
    cfg.to_yaml(tmp_path / "a.yaml")
    (tmp_path / "holder.py").write_text(HOLDER)
    started, go = tmp_path / "started", tmp_path / "go"
    holder = subprocess.Popen([sys.executable, str(tmp_path / "holder.py"), str(started), str(go), str(tmp_path / "a.yaml")],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(started, holder)
        # the case: the same run name with another seed, from the command line
        t0 = time.time()
        second = run_cli("refine", "--preset", "micro", "--output-dir", cfg.output_dir, "--run-name", "shared",
                         "--seed", "1", "--epochs", "1", "--batch-size", "32")
        line = one_error_line(second)
        assert "shared" in line and "in use by another process" in line and f"pid {holder.pid}" in line
        assert "--run-name" in line
        assert time.time() - t0 < 60  # refused at once, not after building anything
        # another run name is independent, even while the first one holds its lock
        other = refine(micro_config(tmp_path, run_name="other", max_steps=2), progress=False)
        assert (other / "summary.json").is_file()
        go.write_text("")
        assert holder.wait(timeout=240) == 0, holder.stderr.read()[-3000:]
    finally:
        if holder.poll() is None:
            holder.kill()
    run_dir = Path(cfg.output_dir) / "shared"
    assert RunConfig.from_yaml(run_dir / "config.yaml").seed == 0  # the holder's config, not the refused one's
    summary = json.loads((run_dir / "summary.json").read_text())
    train = steps_of(run_dir, "train")
    assert train == list(range(1, summary["steps"] + 1))  # every log line once
    val = steps_of(run_dir, "val")
    assert val == sorted(set(val)) and val[0] == 0
    for name in ("model_best.safetensors", "model_final.safetensors", "checkpoints/last.pt", "base.json"):
        assert (run_dir / name).is_file(), name
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == summary["steps"]
    assert not (run_dir / rundir.LOCK_FILE).exists()  # released with the process


def test_lock_in_the_same_process_refuses_refine_and_is_released_after_it(tmp_path, micro_base):
    """A sweep or a notebook runs refine in-process: a run held by another lock in this process is refused too."""
    cfg = micro_config(tmp_path, run_name="held", max_steps=2)
    with RunLock.acquire(cfg.resolved().run_dir):
        with pytest.raises(RunInUseError, match=r"run .*held is in use by another process \(pid \d+\)"):
            refine(cfg, progress=False)
    run_dir = refine(cfg, progress=False)  # free again
    assert (run_dir / "summary.json").is_file() and not (run_dir / rundir.LOCK_FILE).exists()
    assert refine(cfg, progress=False) == run_dir  # a finished run is returned as is


def test_sweep_records_a_run_held_by_another_process_and_runs_the_others(tmp_path, micro_base):
    from clip_refine_lab import sweep as sw

    spec = sw.parse_spec({"name": "locked", "preset": "micro", "seeds": [0], "base": {"max_steps": 1},
                          "blocks": {"main": {"table": "main", "grid": {"method": ["contrastive", "hycd"]}}}})
    runs = sw.expand(spec, tmp_path / "sw")
    with RunLock.acquire(runs[0].run_dir):
        report = sw.run_sweep(spec, tmp_path / "sw", progress=False, evaluate=False, outputs=False)
    assert [k for k, _ in report.failed] == [runs[0].key] and "in use by another process" in report.failed[0][1]
    assert report.ran == [runs[1].key] and (runs[1].run_dir / "summary.json").is_file()


def test_lock_is_recovered_after_kill_9(tmp_path):
    run_dir = tmp_path / "runs" / "killed"
    script = f"""
import os, signal
from clip_refine_lab.rundir import RunLock
RunLock.acquire({str(run_dir)!r})
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (run_dir / rundir.LOCK_FILE).is_file()  # left behind, but no longer locked
    with RunLock.acquire(run_dir):
        assert (run_dir / rundir.LOCK_FILE).read_text().strip() == str(os.getpid())


def test_torchrun_ranks_are_refused_together_and_run_when_free(tmp_path, micro_base):
    """Rank 0 takes the lock for every rank: a held run stops both ranks (no deadlock), a free one trains."""
    cfg = micro_config(tmp_path, run_name="ddp", max_steps=2)
    script = tmp_path / "ddp_refine.py"
    script.write_text(textwrap.dedent(f"""
        from clip_refine_lab.config import RunConfig
        from clip_refine_lab.distributed import init_distributed_from_env
        from clip_refine_lab.training.loop import refine
        init_distributed_from_env()
        refine(RunConfig.from_yaml({str(tmp_path / 'cfg.yaml')!r}), progress=False)
    """))
    cfg.to_yaml(tmp_path / "cfg.yaml")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(script)]
    run_dir = cfg.resolved().run_dir
    with RunLock.acquire(run_dir):
        refused = subprocess.run(launch, env=ENV, capture_output=True, text=True, timeout=240)
    assert refused.returncode != 0 and "in use by another process" in refused.stderr, refused.stderr[-3000:]
    assert not (run_dir / "config.yaml").exists()
    ran = subprocess.run(launch, env=ENV, capture_output=True, text=True, timeout=240)
    assert ran.returncode == 0, ran.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and steps_of(run_dir, "train") == [1, 2]


# ------------------------------------------------------------------------------------- non-finite
def test_huge_lr_stops_at_the_nan_validation_and_writes_no_checkpoint(tmp_path, micro_base):
    cfg = micro_config(tmp_path, run_name="lr", lr=1e30, val_every=1)
    for _ in range(2):  # the rerun starts over instead of resuming from weights of 1e30
        with pytest.raises(NonFiniteLossError) as err:
            refine(cfg, progress=False)
        msg = str(err.value)
        assert "validation loss is nan at step 1" in msg and "no checkpoint was written" in msg
        assert "--restart" in msg and "\n" not in msg
    run_dir = cfg.resolved().run_dir
    assert not (run_dir / "checkpoints" / "last.pt").exists()
    assert steps_of(run_dir, "val") == [0] and steps_of(run_dir, "train") == [1]  # the log matches the error
    best = load_file(str(run_dir / "model_best.safetensors"))  # the starting model, finite
    assert all(torch.isfinite(t).all() for t in best.values())
    assert not (run_dir / "model_final.safetensors").exists() and not (run_dir / "summary.json").exists()


def test_huge_prior_sigma_names_no_checkpoint_that_does_not_exist(tmp_path, micro_base):
    proc = run_cli("refine", "--preset", "micro", "--output-dir", str(tmp_path / "runs"), "--run-name", "sigma",
                   "--prior-sigma", "1e30", "--epochs", "1", "--batch-size", "32")
    line = one_error_line(proc)
    assert "validation loss is inf at step 0" in line and "no checkpoint was written" in line
    assert "prior_sigma" in line and "last.pt" not in line
    assert not (tmp_path / "runs" / "sigma" / "checkpoints").exists()
    # the corrected command takes the run over with --restart
    fixed = run_cli("refine", "--preset", "micro", "--output-dir", str(tmp_path / "runs"), "--run-name", "sigma",
                    "--max-steps", "1", "--epochs", "1", "--batch-size", "32", "--restart")
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert RunConfig.from_yaml(tmp_path / "runs" / "sigma" / "config.yaml").prior_sigma == 1.0


def test_non_finite_loss_step_matches_the_log_and_names_the_kept_checkpoint(tmp_path, micro_base, monkeypatch):
    from clip_refine_lab.training import loop as train

    original, calls = train.loss_terms, {"n": 0}

    def poisoned(method, cfg, image, text, **kw):
        terms = original(method, cfg, image, text, **kw)
        if torch.is_grad_enabled():  # a training step (validation runs without grad)
            calls["n"] += 1
            if calls["n"] == 4:  # the 4th update's batch, logged as step 4
                terms["hycd"] = terms["hycd"] * float("inf")
        return terms

    monkeypatch.setattr(train, "loss_terms", poisoned)
    cfg = micro_config(tmp_path, run_name="inf", epochs=2, checkpoint_every=2, val_every=100)
    with pytest.raises(NonFiniteLossError) as err:
        refine(cfg, progress=False)
    run_dir = cfg.resolved().run_dir
    assert steps_of(run_dir, "train") == [1, 2, 3]
    last = run_dir / "checkpoints" / "last.pt"
    assert "loss term 'hycd' is inf at step 4" in str(err.value)
    assert f"{last} (step 2) is kept" in str(err.value)
    assert torch.load(last, weights_only=True)["step"] == 2


def test_non_finite_parameter_stops_before_the_checkpoint(tmp_path, micro_base, monkeypatch):
    from clip_refine_lab.training import loop as train

    original = train.Refiner.optimizer_step
    count = {"n": 0}

    def corrupting_step(self):
        original(self)
        count["n"] += 1
        if count["n"] == 2:
            with torch.no_grad():
                self.model.logit_scale.fill_(float("nan"))

    monkeypatch.setattr(train.Refiner, "optimizer_step", corrupting_step)
    cfg = micro_config(tmp_path, run_name="param", checkpoint_every=1, val_every=100, val_fraction=0.0)
    with pytest.raises(NonFiniteLossError, match=r"parameter 'logit_scale' is nan at step 2;.*\(step 1\) is kept"):
        refine(cfg, progress=False)
    state = torch.load(cfg.resolved().run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 1 and all(torch.isfinite(t).all() for t in state["model"].values())


# ------------------------------------------------------------------------- corrupt checkpoints, restart
def _unfinished_run(tmp_path, name: str) -> tuple[RunConfig, Path]:
    cfg = micro_config(tmp_path, run_name=name, max_steps=2)
    run_dir = refine(cfg, progress=False)
    (run_dir / "summary.json").unlink()  # as if killed after its last checkpoint
    return cfg, run_dir


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_corrupt_last_checkpoint_is_one_line_offering_restart(tmp_path, micro_base, damage):
    cfg, run_dir = _unfinished_run(tmp_path, f"corrupt-{damage}")
    last = run_dir / "checkpoints" / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(4096))
    with pytest.raises(UnreadableCheckpointError) as err:
        refine(cfg, progress=False)
    msg = str(err.value)
    assert str(last) in msg and "--restart" in msg and "\n" not in msg and "weights_only" not in msg
    proc = run_cli("refine", "--config", str(run_dir / "config.yaml"))
    assert "--restart" in one_error_line(proc)
    run_dir = refine(cfg, progress=False, restart=True)
    assert (run_dir / "summary.json").is_file() and steps_of(run_dir, "train") == [1, 2]
    assert torch.load(last, weights_only=True)["step"] == 2


def test_restart_discards_the_run_but_keeps_other_files(tmp_path, micro_base):
    cfg, run_dir = _unfinished_run(tmp_path, "again")
    (run_dir / "notes.txt").write_text("mine")
    changed = micro_config(tmp_path, run_name="again", max_steps=1, alpha=0.9)
    with pytest.raises(ConfigError, match=r"different configuration \(alpha\).*--restart"):
        refine(changed, progress=False)
    refine(changed, progress=False, restart=True)
    assert RunConfig.from_yaml(run_dir / "config.yaml").alpha == 0.9
    assert steps_of(run_dir, "train") == [1] and (run_dir / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------------- disk full
def _no_space(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_writing_last_pt_keeps_the_previous_checkpoint(tmp_path, micro_base, monkeypatch):
    cfg = micro_config(tmp_path, run_name="full", epochs=2, checkpoint_every=2, val_every=100)
    real_save, calls = torch.save, {"n": 0}

    def filling_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"partial")
            _no_space()
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", filling_save)
    with pytest.raises(utils.DiskFullError) as err:
        refine(cfg, progress=False)
    run_dir = cfg.resolved().run_dir
    msg = str(err.value)
    assert msg.startswith("disk full: last.pt in " + str(run_dir / "checkpoints"))
    assert "needs about" in msg and "free there" in msg and "\n" not in msg
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 2  # the earlier one
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))
    monkeypatch.setattr(torch, "save", real_save)
    refine(cfg, progress=False)  # resumes from step 2 once there is space again
    summary = json.loads((run_dir / "summary.json").read_text())
    assert steps_of(run_dir, "train") == list(range(1, summary["steps"] + 1))


def test_disk_full_while_writing_safetensors_is_one_line(tmp_path, micro_base, monkeypatch):
    import safetensors.torch

    def failing_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"x" * 100)
        raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                           'message: "No space left on device" })')

    cfg = micro_config(tmp_path, run_name="st", max_steps=2)
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    with pytest.raises(utils.DiskFullError, match=r"disk full: model_best.safetensors in .*st .*free there"):
        refine(cfg, progress=False)
    assert not (cfg.resolved().run_dir / "model_best.safetensors").exists()


class _FillingFile(io.FileIO):
    """A file whose disk fills after a few bytes of the first write."""

    def write(self, b):
        if not getattr(self, "wrote", False):
            self.wrote = True
            return super().write(bytes(b)[:5])
        _no_space()


def test_disk_full_while_appending_a_log_line_keeps_the_log_readable(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    utils.append_jsonl(log, {"kind": "train", "step": 1})
    before = log.read_bytes()
    monkeypatch.setattr(utils, "open", lambda path, mode, buffering=-1: _FillingFile(path, mode), raising=False)
    with pytest.raises(utils.DiskFullError, match=r"disk full: log.jsonl in .* needs about \d+ B \(.* free there\)"):
        utils.append_jsonl(log, {"kind": "train", "step": 2})
    assert log.read_bytes() == before and utils.read_jsonl(log) == [{"kind": "train", "step": 1}]


def test_disk_full_in_an_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    utils.atomic_write_json(target, {"old": True})
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: _no_space())
    with pytest.raises(utils.DiskFullError, match=r"summary.json in .* needs about \d+ B"):
        utils.atomic_write_json(target, {"new": True})
    assert json.loads(target.read_text()) == {"old": True} and not list(tmp_path.glob(".*.tmp"))


def test_torch_short_write_counts_as_disk_full_only_when_space_is_short(tmp_path, monkeypatch):
    short = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(utils, "free_space", lambda folder: 1000)
    assert utils.is_disk_full(short, tmp_path, needed=5000)
    monkeypatch.setattr(utils, "free_space", lambda folder: 10**12)
    assert not utils.is_disk_full(short, tmp_path, needed=5000)
    assert not utils.is_disk_full(RuntimeError("some other failure"), tmp_path)
    assert utils.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path)


# ------------------------------------------------------------------------ output paths and run names
def test_output_dir_naming_a_file_is_a_clear_error(tmp_path, micro_base):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for output_dir in (blocker, blocker / "below"):
        with pytest.raises(ConfigError, match=rf"output_dir: {blocker} is a file, not a folder"):
            refine(micro_config(tmp_path, output_dir=str(output_dir)), progress=False)
    assert blocker.read_text() == "not a folder"
    line = one_error_line(run_cli("refine", "--output-dir", str(blocker), "--run-name", "x"))
    assert "is a file, not a folder" in line


@pytest.mark.parametrize("name", ["", "  ", "../x", "..", ".", "a/b", "a\\b", ".hidden", " padded", "tab\there"])
def test_bad_run_names_are_refused(name):
    with pytest.raises(ConfigError, match=r"run_name must be a folder name: not empty, no '/'"):
        RunConfig(run_name=name).validate()


@pytest.mark.parametrize("name", ["hycd-s0", "clip-refine-20250101-120000-s3", "quick-micro", "rafa0.5-hycd0-s0", "a b"])
def test_good_run_names_pass(name):
    assert RunConfig(run_name=name).validate().run_name == name


def test_bad_run_name_on_the_command_line_writes_nothing(tmp_path):
    out = tmp_path / "runs"
    for name in ("", "../escape"):
        line = one_error_line(run_cli("refine", "--output-dir", str(out), "--run-name", name))
        assert "run_name must be a folder name" in line
    assert not out.exists() and not (tmp_path / "escape").exists()


def test_refused_run_leaves_no_empty_directory(tmp_path, micro_base):
    with pytest.raises(ConfigError, match="larger than the training set"):
        refine(micro_config(tmp_path, run_name="too-big", batch_size=100000), progress=False)
    assert not (tmp_path / "runs" / "too-big").exists()


# ---------------------------------------------------------------------------- papermill and --extra
def test_papermill_list_and_dict_strings_are_parsed():
    from papermill.cli import _resolve_type  # what `papermill -p NAME VALUE` hands the notebook

    ns = {"runs": _resolve_type('["run-a", "run-b"]'), "output_dir": "runs", "preset": None,
          "show_widgets": False, "figure_dir": None}
    assert ns["runs"] == '["run-a", "run-b"]'  # papermill passes it as text
    assert parameters.check_parameters(ns, "03_zero_shot").runs == ["run-a", "run-b"]
    assert parameters.check_parameters(ns | {"runs": "[run-a, run-b]"}, "03_zero_shot").runs == ["run-a", "run-b"]
    assert parameters.check_parameters(ns | {"runs": "run-a"}, "03_zero_shot").runs == "run-a"
    with pytest.raises(parameters.ParameterError, match=r"03_zero_shot: runs: could not read .* as a list"):
        parameters.check_parameters(ns | {"runs": '["run-a", '}, "03_zero_shot")
    with pytest.raises(parameters.ParameterError, match="runs must be None, a run name/path or a non-empty list"):
        parameters.check_parameters(ns | {"runs": "[]"}, "03_zero_shot")

    geo = {"runs": None, "output_dir": "runs", "preset": None, "dataset": None, "class_task": None,
           "lambdas": _resolve_type("[0, 0.5, 1.0]"), "figure_dir": None}
    assert parameters.check_parameters(geo, "05_geometry").lambdas == [0, 0.5, 1.0]


def test_papermill_options_string_reaches_the_run_config():
    from papermill.cli import _resolve_type

    import ast

    cells = json.loads((REPO / "notebooks" / "02_refine.ipynb").read_text())["cells"]
    cell = next(c for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
    defaults = {n.targets[0].id: ast.literal_eval(n.value) for n in ast.parse("".join(cell["source"])).body}
    ns = defaults | {"options": _resolve_type('{"weight_decay": 0.0, "warmup_steps": 5}')}
    cfg = parameters.check_parameters(ns, "02_refine").config
    assert cfg.weight_decay == 0.0 and cfg.warmup_steps == 5


def test_docs_give_the_papermill_syntax_that_works():
    text = (REPO / "docs" / "notebooks.md").read_text()
    assert """-p runs '["run-a", "run-b"]'""" in text and """-p options '{"weight_decay": 0.0}'""" in text


def test_extra_flags_fill_run_config_extra(tmp_path):
    parser = cli.build_parser()
    args = parser.parse_args(["refine", "--extra", "note=first try", "--extra", "n=3", "--extra", "tags=[1, 2]"])
    assert cli.config_from_args(args).extra == {"note": "first try", "n": 3, "tags": [1, 2]}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"extra": {"owner": "me", "n": 1}}))
    args = parser.parse_args(["refine", "--config", str(tmp_path / "run.yaml"), "--extra", "n=2"])
    assert cli.config_from_args(args).extra == {"owner": "me", "n": 2}
    assert cli.config_from_args(parser.parse_args(["refine"])).extra == {}
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["refine", "--extra", "no-equals-sign"])
    assert exit_.value.code == 2


def test_extra_is_recorded_and_does_not_block_resuming(tmp_path, micro_base):
    out = str(tmp_path / "runs")
    common = ["refine", "--preset", "micro", "--output-dir", out, "--run-name", "noted", "--max-steps", "1",
              "--epochs", "1", "--batch-size", "32"]
    assert cli.main([*common, "--extra", "note=hello"]) == 0
    saved = RunConfig.from_yaml(Path(out) / "noted" / "config.yaml")
    assert saved.extra == {"note": "hello"}
    assert cli.main([*common, "--extra", "note=other"]) == 0  # notes are not part of what is computed
