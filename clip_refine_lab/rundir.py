"""The run directory: the one layout that training writes and evaluation, sweeps and notebooks read.

A run directory ``<output_dir>/<run_name>/`` holds ``config.yaml`` (the resolved RunConfig),
``base.json`` (the starting model's spec), ``log.jsonl`` (train and val records), ``checkpoints/``
(``last.pt`` for resuming), ``model_best.safetensors`` / ``model_final.safetensors``, and after
evaluation ``metrics.json`` / ``metrics.csv``; ``summary.json`` marks a finished run.

Where runs go: a relative ``output_dir`` (default ``"runs"``) is taken from ``$CLIP_REFINE_LAB_OUTPUT_ROOT``
when set (tests point it at a temporary folder), else from the *project root* (the folder holding
``pyproject.toml`` and ``clip_refine_lab/``, found from the working directory upwards; the working
directory itself when there is none). JupyterLab and nbval start kernels in ``notebooks/`` and
papermill in the caller's folder: all of them read and write ``<repo>/runs``, the folder the command
line uses when run from the repository root.

One process owns a run directory: :class:`RunLock` holds an exclusive advisory lock (``flock``) on
its ``.lock`` file while the run trains, so a second process given the same run name is refused at
once instead of mixing its files into the first one's. The operating system drops the lock when
the process ends, killed or not, so a lock is never stale.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from .config import ConfigError, RunConfig, preset_name
from .models.checkpoints import ModelSpec
from .utils import atomic_write, disk_full_error, is_disk_full, read_jsonl

OUTPUT_ROOT_ENV = "CLIP_REFINE_LAB_OUTPUT_ROOT"
LOG_FILE = "log.jsonl"
LOCK_FILE = ".lock"
CHECKPOINT_DIR = "checkpoints"
# Every file a run or its evaluation writes: what starting a run over removes (anything else is the user's).
RUN_FILES = ("config.yaml", "base.json", LOG_FILE, "model_best.safetensors", "model_final.safetensors",
             "prior_stats.safetensors", "leakage.json", "summary.json", "metrics.json", "metrics.csv")


class RunInUseError(ConfigError):
    """Another process holds the run directory's lock."""


# ------------------------------------------------------------------------------ where runs are
def project_root(start: str | os.PathLike | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: the working directory) that holds this
    project (``pyproject.toml`` and ``clip_refine_lab/``); ``start`` itself when there is none."""
    here = Path(start or os.getcwd()).resolve()
    for d in (here, *here.parents):
        if (d / "pyproject.toml").is_file() and (d / "clip_refine_lab").is_dir():
            return d
    return here


def resolve_output_dir(output_dir: str | os.PathLike = "runs", start: str | os.PathLike | None = None) -> Path:
    """``output_dir`` as an absolute path; a relative one is taken from ``$CLIP_REFINE_LAB_OUTPUT_ROOT``,
    else from the project root."""
    p = Path(output_dir).expanduser()
    if p.is_absolute():
        return p
    root = os.environ.get(OUTPUT_ROOT_ENV)
    return (Path(root).expanduser() if root else project_root(start)) / p


def resolve_path(path: str | os.PathLike) -> Path:
    """A user-given file path: as given when it exists (relative to the working directory), else taken
    from the project root (so ``data_manifests/x.yaml`` works from notebooks/ and the repository root)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve() if p.exists() else p
    rooted = project_root() / p
    return rooted if rooted.exists() else p


# ------------------------------------------------------------------------------- finding runs
def run_preset(run_dir: Path) -> str | None:
    import yaml

    try:
        return (yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}).get("preset")
    except (OSError, yaml.YAMLError):
        return None


def finished_runs(output_dir: str | os.PathLike = "runs", preset: str | None = None) -> list[Path]:
    """Finished run directories (with ``summary.json``) under ``output_dir`` of ``preset`` (default:
    the current one), oldest first. ``preset="any"`` lists every run."""
    root = resolve_output_dir(output_dir)
    want = None if preset == "any" else preset_name(preset)
    done = sorted(root.glob("*/summary.json"), key=lambda p: (p.stat().st_mtime, p.parent.name))
    return [p.parent for p in done if want is None or run_preset(p.parent) == want]


def latest_run(output_dir: str | os.PathLike = "runs") -> Path:
    """The most recently finished run directory under ``output_dir``, of any preset."""
    done = finished_runs(output_dir, "any")
    if not done:
        raise FileNotFoundError(f"no finished run under {resolve_output_dir(output_dir)}/; run "
                                "notebooks/02_refine.ipynb or `clip-refine-lab refine` first")
    return done[-1]


def find_run(name: str | os.PathLike, output_dir: str | os.PathLike = "runs") -> Path:
    """A run directory from a path or a name under ``output_dir``; FileNotFoundError lists the runs."""
    candidates = [Path(name).expanduser()]
    if not candidates[0].is_absolute():
        candidates = [resolve_output_dir(output_dir) / name, Path.cwd() / name, project_root() / name]
    for c in candidates:
        if (c / "config.yaml").is_file():
            if not (c / "summary.json").is_file():
                raise FileNotFoundError(f"run {c} is not finished (no summary.json); finish it with "
                                        f"`clip-refine-lab refine --run-name {c.name} --resume` or notebooks/02_refine.ipynb")
            return c.resolve()
    known = [p.name for p in finished_runs(output_dir, "any")]
    raise FileNotFoundError(f"no run '{name}' under {resolve_output_dir(output_dir)}; finished runs there: "
                            f"{', '.join(known) or 'none'}")


# ------------------------------------------------------------------------------ reading a run
def run_config(run_dir: str | os.PathLike) -> RunConfig:
    return RunConfig.from_yaml(Path(run_dir) / "config.yaml")


def load_run_spec(run_dir: str | os.PathLike) -> ModelSpec:
    """The starting model's spec recorded in a run directory."""
    values = json.loads((Path(run_dir) / "base.json").read_text())
    return ModelSpec(**values)


def read_log(run_dir: str | os.PathLike, kind: str = "train") -> list[dict]:
    """The records of one kind (``train`` or ``val``) of a run's ``log.jsonl``."""
    return [r for r in read_jsonl(Path(run_dir) / LOG_FILE) if r["kind"] == kind]


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (a killed run may have left some)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    keep = [line for line in lines if step > 0 and json.loads(line)["step"] <= step]
    atomic_write(path, "".join(line + "\n" for line in keep))


# ------------------------------------------------------------------------------ owning a run
def make_run_dir(run_dir: Path) -> None:
    """Create ``run_dir`` and its parents; ConfigError when a file is in the way or it cannot be made."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), run_dir)
        raise ConfigError(f"output_dir: {blocker} is a file, not a folder; choose another --output-dir "
                          f"(or --run-name) for {run_dir}") from None
    except PermissionError:
        raise ConfigError(f"output_dir: no permission to create {run_dir}; choose another --output-dir") from None
    except OSError as e:
        if is_disk_full(e, run_dir.parent):
            raise disk_full_error(run_dir) from None
        raise


class RunLock:
    """An exclusive lock on a run directory, held from :meth:`acquire` to :meth:`release`.

    ``flock`` locks belong to an open file, so a second lock in the same process (a sweep running
    runs one after another, a notebook) is refused like one in another process. The lock file is
    removed on release; :meth:`acquire` checks that the file it locked is still the one at the path,
    so a process that opened it just before it was removed tries again instead of sharing it."""

    def __init__(self, run_dir: Path, fd: int):
        self.run_dir, self._fd = run_dir, fd

    @classmethod
    def acquire(cls, run_dir: str | os.PathLike) -> "RunLock":
        run_dir = Path(run_dir)
        try:
            return cls._acquire(run_dir)
        except OSError as e:
            if is_disk_full(e, run_dir):
                raise disk_full_error(run_dir / LOCK_FILE) from None
            raise

    @classmethod
    def _acquire(cls, run_dir: Path) -> "RunLock":
        import fcntl

        path = run_dir / LOCK_FILE
        while True:
            make_run_dir(run_dir)  # again after a release that removed the (empty) directory
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                os.close(fd)
                raise RunInUseError(f"run {run_dir} is in use by another process{holder}: wait for it to finish, "
                                    "or choose another --run-name") from None
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            os.close(fd)  # locked a lock file that its holder removed meanwhile: take the new one
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            os.close(fd)
            raise
        return cls(run_dir, fd)

    def release(self) -> None:
        """Drop the lock, its file, and the run directory when nothing else was written into it."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            (self.run_dir / LOCK_FILE).unlink()
        with contextlib.suppress(OSError):
            self.run_dir.rmdir()  # only succeeds when empty: a run refused before writing anything
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _lock_holder(fd: int) -> str:
    """`` (pid N)`` as the holder recorded it, or nothing when it has not yet."""
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.pread(fd, 32, 0).decode().strip())
        return f" (pid {pid})"
    return ""


def discard_run(run_dir: Path) -> list[str]:
    """Remove what a run wrote into ``run_dir`` (:data:`RUN_FILES`, ``checkpoints/``, unfinished
    temporary files), so that it starts over; returns the names removed. Other files are kept."""
    removed = []
    for name in RUN_FILES:
        with contextlib.suppress(FileNotFoundError):
            (run_dir / name).unlink()
            removed.append(name)
    if (run_dir / CHECKPOINT_DIR).is_dir():
        shutil.rmtree(run_dir / CHECKPOINT_DIR)
        removed.append(CHECKPOINT_DIR)
    for tmp in run_dir.glob(".*.tmp"):
        tmp.unlink()
    return removed
