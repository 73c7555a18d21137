"""The post-pre-training loop: ``refine(config) -> run_dir``.

One readable loop in the spirit of nanoGPT's train.py. Per step:

1. take the step's global batch from the data source (:mod:`.sources`: listed caption pairs or
   streamed WebDataset shards; order and caption choice are pure functions of seed, epoch and
   index, so a resumed run sees exactly the batches an uninterrupted one would);
2. draw the step's randomness (RaFA prior sample z, m2-mix lambda) from a generator seeded by
   (seed, step): again nothing to save for resuming;
3. teacher features for the whole batch (frozen copy of the starting model, no grad; or read from
   the teacher cache, :mod:`.caches`);
4. student features and loss, with OpenCLIP-style gradient accumulation when ``accum_steps > 1``:
   a no-grad forward of every micro-batch caches features, then each micro-batch is re-forwarded
   with grad and the loss is computed on the full batch (its features spliced into the cached
   ones), so the B x B logits keep all negatives and the summed gradients equal the full batch's;
5. with several processes (torchrun), features are all-gathered with gradient for the local slice,
   every rank computes the global-batch loss times the world size, and gradients are averaged:
   the result equals the single-process gradient of the global batch; with ``fsdp`` the student and
   teacher are sharded (:func:`clip_refine_lab.distributed.shard_model`) and FSDP's reduce-scatter
   does the averaging;
6. a non-finite loss term stops the run naming the step and the term, and so do a non-finite
   validation loss or parameter before any checkpoint is written; checkpoints written before stay as
   they are (:mod:`.state`);
7. AdamW step, logging (JSONL + progress bar), validation with best-checkpoint selection (the
   released code keeps the checkpoint with the lowest validation loss), periodic atomic checkpoints.

One process owns the run directory while it trains (:class:`clip_refine_lab.rundir.RunLock`, taken by
:func:`refine` before anything is written; with torchrun, by rank 0 for all ranks).

The run directory's layout is :mod:`clip_refine_lab.rundir`'s; this loop also writes
``prior_stats.safetensors`` (the *-stats priors' statistics) and ``leakage.json`` (image-id overlap
with the evaluation sets of ``leakage_suite``, when set).
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..config import ConfigError, RunConfig
from ..data.manifest import load_manifest
from ..distributed import (average_gradients, gather_features, is_sharded, model_state_dict, replicated_parameters,
                           resolve_device, shard_model, world_info)
from ..embedded.base import ensure_base, ensure_world, resolve_pretrained
from ..methods import Method, get_method, loss_terms
from ..models.checkpoints import save_checkpoint
from ..models.families import logit_bias
from ..models.loading import LoadedModel, embedded_base, is_embedded, load_model
from ..models.memory import check_memory_fits
from ..models.speed import (compile_towers, encode_text_trimmed, train_with_frozen_batch_norm, use_channels_last,
                            use_sdpa_attention)
from ..optim import build_adamw, clamp_logit_scale, lr_at, set_lr
from ..priors import build_prior
from ..progress import progress_bar, stage
from ..rundir import RunInUseError, RunLock, discard_run, truncate_log
from ..utils import append_jsonl, atomic_write_json, read_jsonl, seed_everything
from .caches import TeacherFeatures, prior_statistics
from .preflight import check_run
from .sources import is_manifest_path, open_source, resolve_data
from .state import check_finite, check_parameters, check_validation_loss, load_state, run_is_complete, save_state


def step_generator(seed: int, step: int) -> torch.Generator:
    """The step's own generator: randomness is a pure function of (seed, step), so resuming needs no RNG state."""
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + step) % (2**63))
    return g


def beta_inverse_cdf(beta: float, u: float) -> float:
    """The Beta(beta, beta) quantile of u: a Beta draw from one uniform draw of our own generator."""
    from scipy.special import betaincinv

    return float(betaincinv(beta, beta, u))


def step_record(terms: dict, step: int, epoch: int, lr: float, pairs_per_s: float, logit_scale: float,
                logit_bias: float | None = None) -> dict:
    """One log line: every loss term, lr, the batch modality gap, mean raw norms, logit scale (and the
    logit bias of a sigmoid-loss model), throughput."""
    fi, ft = terms["_features"]
    fin, ftn = torch.nn.functional.normalize(fi, dim=-1), torch.nn.functional.normalize(ft, dim=-1)
    record = {"kind": "train", "step": step, "epoch": epoch, "lr": lr}
    record.update({k: float(v) for k, v in terms.items() if not k.startswith("_")})
    record.update(gap=float((fin.mean(0) - ftn.mean(0)).norm()), image_norm=float(fi.norm(dim=-1).mean()),
                  text_norm=float(ft.norm(dim=-1).mean()), logit_scale=logit_scale, pairs_per_s=pairs_per_s)
    if logit_bias is not None:
        record["logit_bias"] = logit_bias
    return record


def minutes_left(log_path: Path, steps: int, batch_size: int) -> str | None:
    """About how long ``steps`` more steps take, from the throughput logged so far (a resumed run)."""
    rates = [r["pairs_per_s"] for r in read_jsonl(log_path) if r.get("kind") == "train" and r.get("pairs_per_s")]
    if not rates:
        return None
    minutes = steps * batch_size / statistics.median(rates) / 60
    return f"{minutes:.0f} min" if minutes >= 1 else "under a minute"


class Refiner:
    """Holds what one run needs; :meth:`run` is the loop. Use :func:`refine` rather than this class."""

    def __init__(self, cfg: RunConfig, *, progress: bool = True, callback=None):
        self.cfg = cfg
        self.progress = progress
        self.callback = callback  # called with every log record (dict), e.g. for a live plot
        self.rank, self.world_size = world_info()
        if cfg.fsdp and self.world_size == 1:
            raise ConfigError("fsdp shards the model across processes: launch with torchrun --nproc_per_node N "
                              "-m clip_refine_lab.cli refine ... --fsdp true (N >= 2), or drop --fsdp")
        self.device = resolve_device(cfg.device)
        self.method: Method = get_method(cfg.method)
        self.run_dir = cfg.run_dir
        check_memory_fits(cfg, self.device, world_size=self.world_size)  # before any weights are loaded

        seed_everything(cfg.seed)
        pretrained = resolve_pretrained(cfg.model, cfg.pretrained, cfg.preset)  # type: ignore[arg-type]
        self.base: LoadedModel = load_model(cfg.model, pretrained, device=self.device,  # type: ignore[arg-type]
                                            quick_gelu=cfg.quick_gelu)
        self.model = self.base.model
        if cfg.attention == "sdpa":
            use_sdpa_attention(self.model)
        want_nhwc = self.device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
        self.channels_last = bool(want_nhwc) and use_channels_last(self.model)
        self.teacher = None
        if self.method.needs_teacher and not cfg.teacher_cache:
            # The teacher is an exact, frozen copy of the starting model (released code: deepcopy + no_grad);
            # with the teacher cache its features are read instead, and no copy takes memory.
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        if cfg.grad_checkpointing:  # the student only: the teacher runs without grad and keeps nothing
            self.model.set_grad_checkpointing(True)
        if cfg.compile:
            for m in (self.model, self.teacher):
                if m is not None:
                    compile_towers(m)
        manifest = load_manifest(resolve_data(cfg), data_root=cfg.data_root)
        if cfg.leakage_suite is not None and not Path(cfg.leakage_suite).is_file():
            raise ConfigError(f"leakage_suite: suite file not found: {cfg.leakage_suite} "
                              "(e.g. data_manifests/suites/paper.yaml)")
        self.source = open_source(cfg, manifest, self.base, rank=self.rank, world_size=self.world_size,
                                  device=self.device, progress=progress and self.rank == 0)
        self.steps_per_epoch, self.total_steps = self.source.steps_per_epoch, self.source.total_steps
        self.has_val = self.source.num_val_pairs > 0
        self.teacher_features = None
        if cfg.teacher_cache and self.method.needs_teacher:
            self.teacher_features = TeacherFeatures(self.base, self.source, device=self.device, progress=progress)
        if cfg.fsdp:
            # after the teacher cache, which fingerprints the whole starting model; before the optimiser,
            # which must hold the sharded parameters. The teacher is sharded too: replicated, a ViT-bigG
            # teacher alone would take 10 GB (fp32) of every device, more than the student's
            # weights, gradients and AdamW states sharded over 8 devices (5 GB).
            for m in (self.model, self.teacher):
                if m is not None:
                    shard_model(m, self.device)
        self.val_every = cfg.val_every or max(1, self.steps_per_epoch // 4)
        self.checkpoint_every = cfg.checkpoint_every or self.val_every
        self.optimizer = build_adamw(self.model.named_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                     exclude_gains=cfg.no_decay_gains, device=next(self.model.parameters()).device)
        self.prior = self._build_prior() if self.method.needs_prior else None
        self.autocast = self._autocast()
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None

    def _build_prior(self):
        cfg = self.cfg
        stats = None
        if cfg.prior.endswith("-stats"):
            stats = prior_statistics(self.run_dir, lambda: self.source.stats_features(self.model, progress=self.progress),
                                     rank=self.rank, device=self.device, progress=self.progress and self.rank == 0,
                                     feature_space=cfg.feature_space)
        return build_prior(cfg.prior, sigma=cfg.prior_sigma, mean=cfg.prior_mean, low=cfg.prior_low,
                           high=cfg.prior_high, vector=cfg.prior_vector, stats=stats)

    def _autocast(self):
        p = self.cfg.precision
        if p == "fp32":
            return contextlib.nullcontext
        if self.device.type != "cuda":
            raise ConfigError(f"precision {p} needs a GPU; on CPU use fp32")
        dtype = torch.bfloat16 if p == "bf16" else torch.float16
        return lambda: torch.autocast("cuda", dtype=dtype)

    # ------------------------------------------------------------------------------- batches
    def to_device(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return (images.to(self.device, non_blocking=True, memory_format=fmt),
                tokens.to(self.device, non_blocking=True))

    def load_batch(self, dataset, indices, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Items of a map-style source loaded in this process, on the device (tests, benchmarks)."""
        return self.to_device(*self.source.load(dataset, indices, epoch))

    def teacher_batch(self, split: str, dataset, indices, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Cached teacher features of these items (None without a teacher cache)."""
        if self.teacher_features is None:
            return None
        return self.teacher_features.batch(split, dataset, indices, epoch)

    # ------------------------------------------------------------------------------- one step
    def encode_text(self, model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """Text features up to the batch's longest caption (exact under the causal mask); a sharded model
        takes open_clip's encode_text, the method FSDP gathers the root's weights for."""
        return model.encode_text(tokens) if self.cfg.fsdp else encode_text_trimmed(model, tokens)

    def compute_loss(self, images: torch.Tensor, tokens: torch.Tensor, step: int, *, train: bool,
                     teacher: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
        """Loss terms for one global batch; with ``train`` also accumulates gradients (OpenCLIP way).

        ``teacher``: this rank's teacher features when they come from the cache (else computed here)."""
        cfg, method = self.cfg, self.method
        gen = step_generator(cfg.seed if train else cfg.seed + 7919, step)
        n_global = images.shape[0] * self.world_size
        extras: dict = {}
        if method.needs_teacher:
            if teacher is None:
                with torch.no_grad(), self.autocast():
                    teacher = (self.teacher.encode_image(images).float(),  # type: ignore[union-attr]
                               self.encode_text(self.teacher, tokens).float())
            ti, tt = gather_features(*teacher)
            extras.update(teacher_image=ti, teacher_text=tt)
        if method.needs_prior:
            dim = self.base.embed_dim
            # one z per pair of the global batch, shared by its image and its text
            extras["z"] = self.prior.sample(n_global, dim, gen).to(self.device, torch.float32)  # type: ignore[union-attr]
        if method.needs_mix:
            # one lambda ~ Beta(beta, beta) per batch, drawn through the step generator (inverse CDF)
            extras["lam"] = beta_inverse_cdf(cfg.m2_beta, float(torch.rand((), generator=gen)))
        model = self.model
        bias = logit_bias(model)  # SigLIP's learned bias: its contrastive terms are the sigmoid loss
        if not train:
            scale = model.logit_scale.exp()
            with torch.no_grad(), self.autocast():
                fi, ft = gather_features(model.encode_image(images).float(), self.encode_text(model, tokens).float())
                return {k: v.detach() for k, v in loss_terms(method, cfg, fi, ft, logit_scale=scale, logit_bias=bias,
                                                             **extras).items()} | {"_features": (fi, ft)}
        micro = images.shape[0] // cfg.accum_steps
        chunks = [(slice(j * micro, (j + 1) * micro)) for j in range(cfg.accum_steps)]
        if cfg.accum_steps > 1:
            with torch.no_grad(), self.autocast():
                cached_i = [model.encode_image(images[c]).float() for c in chunks]
                cached_t = [self.encode_text(model, tokens[c]).float() for c in chunks]
        terms: dict = {}
        for j, c in enumerate(chunks):
            with self.autocast():
                # captions up to the micro-batch's longest: exact under the causal mask (models/speed.py)
                fi_j, ft_j = model.encode_image(images[c]).float(), self.encode_text(model, tokens[c]).float()
            if cfg.accum_steps > 1:
                fi_local = torch.cat(cached_i[:j] + [fi_j] + cached_i[j + 1:])
                ft_local = torch.cat(cached_t[:j] + [ft_j] + cached_t[j + 1:])
            else:
                fi_local, ft_local = fi_j, ft_j
            fi, ft = gather_features(fi_local, ft_local)
            # The logit scale (and bias) enter the loss directly, not through this micro-batch's features: only
            # the first micro-step of rank 0 carries their gradient, or it would be counted accum_steps times
            # (and, with the x world_size below, world_size times after averaging across ranks).
            carries = j == 0 and self.rank == 0
            scale = model.logit_scale.exp() if carries else model.logit_scale.exp().detach()
            step_bias = bias if carries or bias is None else bias.detach()
            terms = loss_terms(method, cfg, fi, ft, logit_scale=scale, logit_bias=step_bias, **extras)
            check_finite(terms, step, self.run_dir)
            # Every rank computed the global-batch loss; x world_size makes the averaged gradients exact.
            backward_loss = terms["loss"] * self.world_size
            if self.scaler is not None:
                self.scaler.scale(backward_loss).backward()
            else:
                backward_loss.backward()
        out = {k: v.detach() for k, v in terms.items()}
        out["_features"] = (fi.detach(), ft.detach())
        return out

    def all_reduce_gradients(self) -> None:
        # FSDP has already reduce-scattered (averaged) the sharded parameters' gradients; what is left
        # is every parameter of an unsharded model, or the replicated 0-dim ones of a sharded one
        if self.world_size > 1:
            average_gradients(replicated_parameters(self.model), self.device, self.world_size)

    def optimizer_step(self) -> None:
        """Unscale (fp16), clip, step, and clamp the temperature, as CLIP does after every update."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        clamp_logit_scale(self.model)

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean method loss on the held-out pairs (fixed z and lambda, so values compare across steps)."""
        if not self.has_val:
            return None
        self.model.eval()
        n_val = self.source.num_val_pairs
        global_bs = max(self.world_size, min(self.cfg.batch_size, n_val) // self.world_size * self.world_size)
        local_bs = global_bs // self.world_size
        total, count = 0.0, 0
        for start, images, tokens, items in self.source.val_batches(global_bs, local_bs):
            images, tokens = self.to_device(images, tokens)
            terms = self.compute_loss(images, tokens, start, train=False,
                                      teacher=self.teacher_batch("val", self.source.val_set, items))
            total += float(terms["loss"]) * global_bs
            count += global_bs
        train_with_frozen_batch_norm(self.model)
        return total / count if count else None

    # ------------------------------------------------------------------------------ writing
    def save_weights(self, name: str, step: int) -> None:
        check_parameters(self.model, step, self.run_dir)  # on every rank: all stop together
        state = model_state_dict(self.model)  # sharded: gathered by every rank, held by rank 0
        if self.rank == 0:
            save_checkpoint(state, self.run_dir / name, self.base.spec, method=self.cfg.method)

    def _emit(self, log_path: Path, record: dict) -> None:
        append_jsonl(log_path, record)
        if self.callback is not None:
            self.callback(record)

    def _validate_and_keep_best(self, log_path: Path, step: int, best_val: float | None) -> float | None:
        val = self.validate()
        check_validation_loss(val, step, self.run_dir)
        improved = val is not None and (best_val is None or val < best_val)
        if improved:
            best_val = val
            self.save_weights("model_best.safetensors", step)
        if self.rank == 0 and val is not None:
            self._emit(log_path, {"kind": "val", "step": step, "val_loss": val, "best": improved})
        return best_val

    # ------------------------------------------------------------------------------------- run
    def run(self) -> Path:
        cfg = self.cfg
        # a sharded model takes its shard of each full tensor from the CPU copy: no full copy on the device
        step, best_val = load_state(self.run_dir, self.model, self.optimizer, self.scaler,
                                    torch.device("cpu") if is_sharded(self.model) else self.device)
        log_path = self.run_dir / "log.jsonl"
        if self.rank == 0:
            truncate_log(log_path, step)
            if step == 0 and cfg.leakage_suite is not None:
                check_leakage(cfg, self.source, self.run_dir, log_path)
        if step == 0 and self.has_val:
            # the starting model is a candidate too: a run that only gets worse keeps it
            best_val = self.validate()
            check_validation_loss(best_val, 0, self.run_dir)
            self.save_weights("model_best.safetensors", 0)
            if self.rank == 0:
                self._emit(log_path, {"kind": "val", "step": 0, "val_loss": best_val, "best": True})
        if self.source.skipped:
            print(self.source.skipped_report(self.run_dir))
        train_with_frozen_batch_norm(self.model)
        show = self.progress and self.rank == 0
        stage(f"Refining with {cfg.method} for {self.total_steps - step} steps", enabled=show,
              about=minutes_left(log_path, self.total_steps - step, cfg.batch_size) if show else None)  # type: ignore[arg-type]
        bar = progress_bar(total=self.total_steps, initial=step, desc=f"refine {cfg.method}", enabled=show,
                           unit="step")
        batches = iter(self.source.train_batches(step))
        while step < self.total_steps:
            epoch = step // self.steps_per_epoch
            t0 = time.perf_counter()
            images, tokens, items = next(batches)
            images, tokens = self.to_device(images, tokens)
            lr = lr_at(step, self.total_steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps, schedule=cfg.schedule)
            set_lr(self.optimizer, lr)
            self.optimizer.zero_grad(set_to_none=True)
            terms = self.compute_loss(images, tokens, step, train=True,
                                      teacher=self.teacher_batch("train", self.source.train_set, items, epoch))
            self.all_reduce_gradients()
            self.optimizer_step()
            step += 1
            if self.rank == 0 and (step % cfg.log_every == 0 or step == self.total_steps):
                if self.device.type == "cuda":  # kernels run asynchronously: time the step, not its launch
                    torch.cuda.synchronize(self.device)
                bias = logit_bias(self.model)
                record = step_record(terms, step, epoch, lr, cfg.batch_size / (time.perf_counter() - t0),  # type: ignore[operator]
                                     float(self.model.logit_scale.exp().item()),
                                     None if bias is None else float(bias.item()))
                self._emit(log_path, record)
                bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in ("loss", "rafa", "hycd", "clip", "gap")})
            bar.update(1)
            if step % self.val_every == 0 or step == self.total_steps:
                best_val = self._validate_and_keep_best(log_path, step, best_val)
            if step % self.checkpoint_every == 0 or step == self.total_steps:  # every rank: sharded states gather
                check_parameters(self.model, step, self.run_dir)
                save_state(self.run_dir, self.model, self.optimizer, self.scaler, step, best_val)
        bar.close()
        self.save_weights("model_final.safetensors", step)
        if not self.has_val:
            self.save_weights("model_best.safetensors", step)
        if self.rank == 0:
            summary = {"steps": step, "best_val_loss": best_val, "skipped_samples": self.source.skipped,
                       "train_pairs": self.source.num_train_pairs, "val_pairs": self.source.num_val_pairs,
                       "world_size": self.world_size, **self.source.summary()}
            atomic_write_json(self.run_dir / "summary.json", summary)
        return self.run_dir


def check_leakage(cfg: RunConfig, source, run_dir: Path, log_path: Path) -> None:
    """Image-id overlap between the training set and the evaluation sets of ``cfg.leakage_suite``.

    Ids only (COCO ids from file names, Flickr photo ids: no image hashing, so it costs a listing of
    each manifest); written to ``leakage.json`` and one ``{"kind": "leakage"}`` line of log.jsonl,
    with a printed warning when any evaluation image is in the training set. Skipped (and logged
    as such) for streaming manifests, whose records the trainer never lists: check them offline
    with ``clip-refine-lab data leakage``. A suite whose data is missing is logged, not fatal.
    """
    from ..data.manifest import ManifestError
    from ..evaluation.suites import load_suite, suite_leakage

    record: dict = {"kind": "leakage", "step": 0, "suite": str(cfg.leakage_suite)}
    if source.streaming:
        record["skipped"] = "streaming manifest: records are not listed; run clip-refine-lab data leakage"
        print(f"leakage check skipped: {source.manifest.path} is streamed (WebDataset); "
              "check it with: clip-refine-lab data leakage TRAIN EVAL...")
    else:
        try:
            suite = load_suite(cfg.leakage_suite, cfg.preset)
            report = suite_leakage(source.manifest, suite, cfg.data_root)
        except (ManifestError, OSError, ValueError) as e:
            record["error"] = f"{type(e).__name__}: {e}"
            print(f"leakage check failed ({record['error']}); training goes on")
        else:
            atomic_write_json(run_dir / "leakage.json", report.to_dict())
            record.update(overlap=sum(e.overlap for e in report.evals),
                          evals={e.name: e.overlap for e in report.evals})
            if report.leaks:
                print("WARNING: evaluation images are in the training set\n" + report.format())
    append_jsonl(log_path, record)  # not through the callback: live plots expect train/val records


# ------------------------------------------------------------------------------------ entry point
@contextlib.contextmanager
def own_run_dir(run_dir: Path, *, restart: bool = False):
    """Hold the run directory's lock while the block runs (rank 0 takes it for every rank of a
    torchrun launch, so a refused launch stops on all ranks at once); with ``restart``, what an
    earlier run wrote there is removed first."""
    rank, world = world_info()
    lock, refused = None, None
    if rank == 0:
        try:
            lock = RunLock.acquire(run_dir)
            if restart:
                removed = discard_run(run_dir)
                if removed:
                    print(f"restart: removed {', '.join(removed)} from {run_dir}")
        except ConfigError as e:
            refused = e
    if world > 1:
        import torch.distributed as dist

        message = [None if refused is None else (isinstance(refused, RunInUseError), str(refused))]
        dist.broadcast_object_list(message, src=0)
        if refused is None and message[0] is not None:
            in_use, text = message[0]
            refused = (RunInUseError if in_use else ConfigError)(text)
    if refused is not None:
        raise refused
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def refine(config: RunConfig, *, progress: bool = True, resume: bool = True, restart: bool = False,
           callback=None) -> Path:
    """Run post-pre-training as configured and return the run directory.

    ``callback(record)`` receives every log record as it is written (train steps and validations),
    for live plots; the records are also in ``log.jsonl``.

    An existing run directory with the same configuration is resumed from its last checkpoint
    (``resume=False`` refuses instead); a complete one (``summary.json``) is returned as is.
    ``restart=True`` removes what an earlier run wrote into the directory (checkpoints, log, weights,
    config) and starts over, whatever its configuration was. A run directory is used by one process
    at a time: another process (or another call) already running it makes this one fail at once with
    :class:`~clip_refine_lab.rundir.RunInUseError`.
    The embedded world and base model are built first when the run needs them and they are not
    cached yet (each announced with one line).
    """
    cfg = config.resolved()
    check_run(cfg, progress=progress)  # every manifest and option, before anything is written
    rank, world = world_info()
    if world > 1 and config.run_name is None:
        raise ConfigError("with several processes, set run_name so that every rank writes the same run")
    with own_run_dir(cfg.run_dir, restart=restart):
        if run_is_complete(cfg, resume=resume):
            return cfg.run_dir
        if not is_manifest_path(str(cfg.data)):
            ensure_world(cfg.preset, progress=progress and rank == 0)
        if is_embedded(cfg.pretrained):
            ensure_base(cfg.model, world_preset=cfg.preset, base=embedded_base(cfg.pretrained),
                        progress=progress and rank == 0)
        refiner = Refiner(cfg, progress=progress, callback=callback)
        if refiner.rank == 0:
            cfg.to_yaml(cfg.run_dir / "config.yaml")
            atomic_write_json(cfg.run_dir / "base.json", asdict(refiner.base.spec))
        return refiner.run()
