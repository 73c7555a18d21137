"""How much memory a post-pre-training run needs on one device, estimated before it starts.

The parts, per device, in bytes:

* **weights**: the student's fp32 parameters (autocast keeps fp32 masters), counted exactly on a
  model built on the meta device (no memory used);
* **gradients**: fp32, one per parameter; **AdamW**: ``exp_avg`` and ``exp_avg_sq``, two fp32 per
  parameter; with FSDP all three are divided by the number of processes;
* **teacher**: the frozen fp32 copy of the starting model, unless its features come from the teacher
  cache (``teacher_cache``), which leaves no teacher in memory;
* **autocast copies**: under bf16/fp16 the forward casts every weight to 16 bits once and keeps the copy
  for backward (2 bytes per parameter);
* **activations**: what the student's forward keeps for backward, per sample from each tower's geometry
  (layers, width, tokens, heads, MLP width) and the precision; with ``grad_checkpointing`` only each
  transformer block's input is kept and one block is recomputed at a time during backward;
* **backward working memory**: about one block's activations for the micro-batch: the activation
  gradients of the block being differentiated or, with checkpointing, its recomputed activations.

What one transformer block keeps per token (counted with ``torch.autograd.graph.saved_tensors_hooks``
on open_clip's blocks, SDPA path): the residual input of each of its two layer norms (fp32 even under
autocast), the first layer norm's output, q/k/v, the attention output, the second layer norm's output,
and the MLP's hidden pre- and post-activation: ``2 * width`` residual values and ``6 * width + 2 *
mlp_width`` activation values, plus per-token layer-norm statistics and the attention's log-sum-exp.
Flash / memory-efficient attention keeps no tokens x tokens matrix (CPU and CUDA kernels alike).

The peak: the text tower's backward runs first (it was recorded last), so the image tower's
activations are still held while the text tower's gradients appear; the image tower then frees its
activations block by block while its gradients appear. The estimate takes the largest of those three
moments plus the backward working memory. Towers without a transformer geometry (ModifiedResNet,
ConvNeXt) are counted by running one sample through them on the meta device with saved-tensor hooks;
checkpointing is not assumed to reduce them.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace

import torch

from ..config import ConfigError, RunConfig
from ..methods import get_method
from .speed import train_with_frozen_batch_norm

GIB = 2**30
#: Set to 0 to start a CUDA run that the estimate says does not fit (the estimate aims within 20 %).
MEMORY_CHECK_ENV = "CLIP_REFINE_LAB_MEMORY_CHECK"


class MemoryEstimateError(ConfigError):
    """The run's estimated memory exceeds the device's free memory; the message says what to change."""


@dataclass(frozen=True)
class TowerShape:
    """The geometry a transformer tower's activations scale with."""

    layers: int
    width: int
    tokens: int
    heads: int
    mlp_width: int
    input_elements: int = 0  # values of one input the tower keeps (the image's pixels for the patch embedding)


@dataclass(frozen=True)
class Architecture:
    """What the estimate needs to know of a model: parameter counts and the towers' geometry."""

    name: str
    parameters: int
    image_parameters: int
    image: TowerShape | None
    text: TowerShape | None
    image_saved_fp32: int = 0  # bytes one sample keeps in an image tower without TowerShape (meta-device count)

    @property
    def text_parameters(self) -> int:
        return self.parameters - self.image_parameters


def _transformer_shape(blocks, width: int, tokens: int, input_elements: int = 0) -> TowerShape:
    block = blocks[0]
    attn = getattr(block, "attn")
    mlp = getattr(block, "mlp")
    fc = getattr(mlp, "c_fc", None) or getattr(mlp, "fc1")
    return TowerShape(layers=len(blocks), width=width, tokens=tokens, heads=int(attn.num_heads),
                      mlp_width=int(fc.out_features), input_elements=input_elements)


def _image_shape(visual) -> TowerShape | None:
    size = getattr(visual, "image_size", 224)
    h, w = (size, size) if isinstance(size, int) else size
    pixels = 3 * int(h) * int(w)
    if hasattr(visual, "transformer") and hasattr(visual, "grid_size"):  # open_clip VisionTransformer
        gh, gw = visual.grid_size
        tokens = gh * gw + (0 if getattr(visual, "class_embedding", None) is None else 1)
        return _transformer_shape(visual.transformer.resblocks, visual.transformer.width, tokens, pixels)
    trunk = getattr(visual, "trunk", None)  # timm tower
    if trunk is not None and hasattr(trunk, "blocks") and hasattr(trunk, "patch_embed"):
        tokens = int(trunk.patch_embed.num_patches) + int(getattr(trunk, "num_prefix_tokens", 0))
        return _transformer_shape(trunk.blocks, int(trunk.embed_dim), tokens, pixels)
    return None


def _text_shape(model) -> TowerShape | None:
    text = getattr(model, "text", model)  # CustomTextCLIP keeps its text tower in .text; CLIP holds it inline
    transformer = getattr(text, "transformer", None)
    if transformer is None or not hasattr(transformer, "resblocks"):
        return None
    tokens = int(text.context_length) + (1 if getattr(text, "cls_emb", None) is not None else 0)
    return _transformer_shape(transformer.resblocks, transformer.width, tokens)


def _meta_saved_bytes(model, visual) -> int:
    """Bytes one sample keeps for backward in ``visual``: its forward on the meta device, through hooks
    (two samples, halved: every storage of the batch scales with it)."""
    size = getattr(visual, "image_size", 224)
    h, w = (size, size) if isinstance(size, int) else size
    params = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in params:
            saved[key] = max(saved.get(key, 0), t.numel() * t.element_size())
        return t

    train_with_frozen_batch_norm(model)  # as the trainer runs it
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.encode_image(torch.zeros(2, 3, int(h), int(w), device="meta"))
    return sum(saved.values()) // 2


@functools.lru_cache(maxsize=16)
def architecture(name: str) -> Architecture:
    """Parameter counts and tower geometry of an open_clip architecture (or one of ours), built on the meta device."""
    import open_clip

    from .loading import register_tiny_architectures

    register_tiny_architectures()
    if name not in open_clip.list_models():
        raise ConfigError(f"model: no memory estimate for '{name}' (not an open_clip architecture name)")
    with torch.device("meta"):  # parameters without storage: built in a moment whatever the size
        model = open_clip.create_model(name, pretrained=None, device="meta")
    image = _image_shape(model.visual)
    return Architecture(name=name, parameters=sum(p.numel() for p in model.parameters()),
                        image_parameters=sum(p.numel() for p in model.visual.parameters()), image=image,
                        text=_text_shape(model),
                        image_saved_fp32=0 if image is not None else _meta_saved_bytes(model, model.visual))


# --------------------------------------------------------------------------------- activations
def block_bytes(shape: TowerShape, tokens: int, act: int) -> int:
    """Bytes one transformer block keeps for backward, per sample (``act``: bytes of an activation value)."""
    per_token = 2 * shape.width * 4 + (6 * shape.width + 2 * shape.mlp_width) * act + 2 * 2 * 4
    return tokens * per_token + shape.heads * tokens * 4


def tower_bytes(shape: TowerShape, *, tokens: int | None = None, act: int, checkpointing: bool) -> tuple[int, int]:
    """(bytes kept until backward, backward working memory), per sample, for one transformer tower."""
    n = tokens or shape.tokens
    block = block_bytes(shape, n, act)
    outside = shape.input_elements * act + 2 * n * shape.width * 4  # patch/token embedding, final layer norm
    kept = outside + shape.layers * (n * shape.width * 4 if checkpointing else block)
    # In backward one block's worth is live on top (its activation gradients; with checkpointing, its recomputed
    # activations, freed as they are used): measured on ViT-B-32 and ViT-L-14 (benchmarks/RESULTS.md).
    return kept, block


@dataclass(frozen=True)
class MemoryEstimate:
    """The parts of one device's memory during a training step, in bytes; ``peak`` is what must fit."""

    model: str
    batch_per_device: int
    micro_batch: int
    precision: str
    grad_checkpointing: bool
    teacher_in_memory: bool
    shards: int
    weights: int
    gradients: int
    optimizer: int
    teacher: int
    autocast_copies: int
    image_activations: int
    text_activations: int
    backward_working: int
    loss: int
    image_gradients: int
    exact_image_activations: bool = True  # False: a conv tower counted without checkpointing (an upper bound)

    @property
    def activations(self) -> int:
        return self.image_activations + self.text_activations

    @property
    def static(self) -> int:
        """What stays allocated across steps: weights, optimiser states and the teacher."""
        return self.weights + self.optimizer + self.teacher

    @property
    def peak(self) -> int:
        text_gradients = self.gradients - self.image_gradients
        during_backward = max(self.activations, self.image_activations + text_gradients, self.gradients)
        return self.static + self.autocast_copies + during_backward + self.backward_working + self.loss

    def rows(self) -> list[tuple[str, int]]:
        return [("weights (fp32)", self.weights), ("gradients (fp32)", self.gradients),
                ("AdamW states (2 x fp32)", self.optimizer), ("teacher copy (fp32)", self.teacher),
                ("autocast 16-bit weight copies", self.autocast_copies),
                (f"activations, image tower ({self.micro_batch} samples)", self.image_activations),
                (f"activations, text tower ({self.micro_batch} samples)", self.text_activations),
                ("backward working memory", self.backward_working), ("loss (B x B logits)", self.loss)]

    def format(self) -> str:
        what = (f"{self.model}, {self.batch_per_device} pairs per device"
                + (f" in micro-batches of {self.micro_batch}" if self.micro_batch != self.batch_per_device else "")
                + f", {self.precision}, grad checkpointing {'on' if self.grad_checkpointing else 'off'}, "
                + ("teacher in memory" if self.teacher_in_memory else "no teacher in memory")
                + (f", weights sharded over {self.shards} processes" if self.shards > 1 else ""))
        lines = [f"memory estimate: {what}"]
        lines += [f"  {name:<44} {gib(n):>9}" for name, n in self.rows()]
        lines.append(f"  {'peak (gradients overlap freed activations)':<44} {gib(self.peak):>9}")
        if not self.exact_image_activations:
            lines.append("  (the image tower is not a transformer: its activations are counted without checkpointing)")
        return "\n".join(lines)


def gib(n: int | float) -> str:
    return f"{n / GIB:.2f} GiB"


def estimate_memory(model: str, *, batch_size: int, accum_steps: int = 1, precision: str = "fp32",
                    grad_checkpointing: bool = False, teacher: bool = True, world_size: int = 1,
                    shards: int = 1, text_tokens: int | None = None) -> MemoryEstimate:
    """The estimate for one device of a run with these settings.

    ``batch_size`` is the global batch (``world_size`` processes share it); ``teacher`` is whether a
    teacher copy is in memory (a method with a teacher, without the teacher cache); ``shards`` divides
    weights, gradients, optimiser states and the teacher (FSDP); ``text_tokens`` the caption columns encoded (default:
    the full context, the most a batch can need)."""
    arch = architecture(model)
    act = 4 if precision == "fp32" else 2
    local = batch_size // world_size
    micro = max(1, local // accum_steps)
    p, p_image = arch.parameters, arch.image_parameters
    if arch.image is not None:
        image_kept, image_work = tower_bytes(arch.image, act=act, checkpointing=grad_checkpointing)
    else:  # counted in fp32 on the meta device; 16-bit activations take about half
        image_kept, image_work = arch.image_saved_fp32 * act // 4, 0
    text_kept, text_work = (tower_bytes(arch.text, tokens=text_tokens, act=act, checkpointing=grad_checkpointing)
                            if arch.text is not None else (0, 0))
    return MemoryEstimate(
        model=model, batch_per_device=local, micro_batch=micro, precision=precision,
        grad_checkpointing=grad_checkpointing, teacher_in_memory=teacher, shards=shards,
        weights=4 * p // shards, gradients=4 * p // shards, optimizer=8 * p // shards, teacher=4 * p // shards if teacher else 0,
        autocast_copies=0 if precision == "fp32" else 2 * p // shards,
        image_activations=micro * image_kept, text_activations=micro * text_kept,
        backward_working=micro * max(image_work, text_work),
        loss=12 * 4 * batch_size * batch_size, image_gradients=4 * p_image // shards,
        exact_image_activations=arch.image is not None or not grad_checkpointing)


def estimate_for_config(cfg: RunConfig, *, world_size: int = 1, text_tokens: int | None = None) -> MemoryEstimate:
    """The estimate for a resolved :class:`RunConfig` run by ``world_size`` processes."""
    teacher = get_method(cfg.method).needs_teacher and not cfg.teacher_cache
    fsdp = cfg.fsdp  # FSDP shards the parameter states and the frozen teacher over the processes
    return estimate_memory(cfg.model, batch_size=cfg.batch_size, accum_steps=cfg.accum_steps,  # type: ignore[arg-type]
                           precision=cfg.precision, grad_checkpointing=cfg.grad_checkpointing, teacher=teacher,
                           world_size=world_size, shards=world_size if fsdp else 1, text_tokens=text_tokens)


# ------------------------------------------------------------------------------- device memory
def device_memory(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of a CUDA device, or of the machine's RAM for the CPU (MemAvailable); None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    if device.type == "cpu":
        try:
            info = dict(line.split(":", 1) for line in open("/proc/meminfo", encoding="ascii"))
        except OSError:
            return None
        return int(info["MemAvailable"].split()[0]) * 1024, int(info["MemTotal"].split()[0]) * 1024
    return None


def advice(cfg: RunConfig, free: int, *, world_size: int = 1) -> list[str]:
    """Changes of the run that lower its estimate, each with the estimate it gives, and one combination that fits."""
    needs_teacher = get_method(cfg.method).needs_teacher
    options: list[tuple[str, RunConfig]] = []
    if cfg.precision == "fp32" and cfg.device != "cpu":  # 16-bit activations: about half
        options.append(("--precision bf16", replace(cfg, precision="bf16")))
    if not cfg.grad_checkpointing:
        options.append(("--grad-checkpointing true", replace(cfg, grad_checkpointing=True)))
    local = cfg.batch_size // world_size  # type: ignore[operator]
    for steps in (2, 4, 8, 16):
        if steps > cfg.accum_steps and local % steps == 0:
            options.append((f"--accum-steps {steps}", replace(cfg, accum_steps=steps)))
    if needs_teacher and not cfg.teacher_cache:
        options.append(("--teacher-cache true", replace(cfg, teacher_cache=True)))
    lines = []
    for flag, changed in options:
        peak = estimate_for_config(changed, world_size=world_size).peak
        lines.append(f"{flag}: {gib(peak)}{'' if peak <= free else ' (still too much alone)'}")
    combined = replace(cfg, grad_checkpointing=True, teacher_cache=cfg.teacher_cache or needs_teacher)
    for steps in sorted({cfg.accum_steps, 2, 4, 8, 16}):
        if steps >= cfg.accum_steps and local % steps == 0:
            candidate = replace(combined, accum_steps=steps)
            peak = estimate_for_config(candidate, world_size=world_size).peak
            if peak <= free:
                flags = ("--grad-checkpointing true" + (" --teacher-cache true" if candidate.teacher_cache else "")
                         + (f" --accum-steps {steps}" if steps > 1 else ""))
                lines.append(f"together: {flags}: {gib(peak)}")
                break
    else:
        lines.append("--fsdp under torchrun to shard weights, gradients and AdamW states over several GPUs")
    return lines


def check_memory_fits(cfg: RunConfig, device: torch.device, *, world_size: int = 1) -> MemoryEstimate | None:
    """Refuse a CUDA run whose estimated peak exceeds the device's free memory, naming what would make it fit.

    Returns the estimate (None on CPU, for an architecture the estimate does not know, or when
    ``CLIP_REFINE_LAB_MEMORY_CHECK=0``)."""
    if device.type != "cuda" or os.environ.get(MEMORY_CHECK_ENV, "1") == "0":
        return None
    try:
        estimate = estimate_for_config(cfg, world_size=world_size)
    except ConfigError:
        return None
    free, total = device_memory(device)  # type: ignore[misc]
    if estimate.peak > free:
        tips = "\n  ".join(advice(cfg, free, world_size=world_size))
        raise MemoryEstimateError(
            f"{cfg.model} at batch {cfg.batch_size} needs about {gib(estimate.peak)} on {device}, which has "
            f"{gib(free)} free of {gib(total)} (refine --dry-run shows the parts). Lower it with:\n  {tips}\n"
            f"(set {MEMORY_CHECK_ENV}=0 to start anyway)")
    return estimate


def dry_run_report(cfg: RunConfig, device: torch.device, *, world_size: int = 1) -> str:
    """What ``refine --dry-run`` prints: the estimate, the device's memory and whether the run fits."""
    estimate = estimate_for_config(cfg, world_size=world_size)
    lines = [estimate.format()]
    memory = device_memory(device)
    if memory is None:
        lines.append(f"device {device}: memory unknown")
        return "\n".join(lines)
    free, total = memory
    what = "free" if device.type == "cuda" else "available RAM"
    lines.append(f"device {device}: {gib(free)} {what} of {gib(total)}")
    if estimate.peak <= free:
        lines.append("fits")
    else:
        lines.append("does not fit; lower it with:")
        lines += [f"  {tip}" for tip in advice(cfg, free, world_size=world_size)]
    lines.append("captions are counted at the full context; the trainer encodes up to each batch's longest caption")
    return "\n".join(lines)
