"""Where training runs: the device, the processes of a torchrun launch, and feature gathering for
data-parallel training in the manner of open_clip's ``gather_features``.

HyCD and the CLIP loss compare every image with every text of the batch, so under data parallelism
each rank gathers the features of all ranks to build the B×B logits of the global batch (as
open_clip does with ``gather_with_grad=False``, ``local_loss=False``): the gathered copies of other
ranks' features are constants, and this rank's own slice is put back as the local tensor so that
backward reaches the local encoders.

Scaling rule. Every rank then computes the same global loss L and back-propagates it, but rank r's
backward only reaches its own slice F_r, so it yields J_rᵀ ∂L/∂F_r (J_r: the Jacobian of its local
features w.r.t. the parameters). The single-process gradient of the global batch is
Σ_r J_rᵀ ∂L/∂F_r, whereas DDP *averages* the ranks' gradients, giving (1/W) Σ_r J_rᵀ ∂L/∂F_r.
Hence: multiply a loss computed on gathered features by ``world_size`` before ``backward()`` (and
log the unscaled value). Per-sample losses computed on local features only (RaFA on the local z)
need no scaling; they are already means whose DDP average is the global mean.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .config import ConfigError

__all__ = ["resolve_device", "init_distributed_from_env", "world_info", "is_main_process", "gather_features"]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` (a GPU when there is one), or the named device, refused when CUDA is missing."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' was requested but CUDA is not available; use device 'cpu' or 'auto'")
    return dev


def init_distributed_from_env() -> None:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1): gloo on CPU, nccl on GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def _distributed_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, or ``(0, 1)`` when not distributed."""
    if not _distributed_active():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    """True on rank 0, and in a non-distributed run; the process that logs and writes files."""
    return world_info()[0] == 0


def gather_features(
    image_features: torch.Tensor, text_features: torch.Tensor, *extra: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """All-gather each tensor along dim 0 across the default process group, rank order.

    Returns ``(all_image, all_text, *all_extra)``. Each result is the concatenation of every rank's
    tensor, with this rank's slice being the *local tensor itself*, so gradient flows into it; the
    other slices carry no gradient. ``extra`` is for anything else indexed by pair that a loss needs
    globally (teacher features, RaFA's z). Outside ``torch.distributed``, or with one process, the
    inputs are returned unchanged (same objects).

    All ranks must pass tensors of identical shapes (``dist.all_gather`` requires it): use a sampler
    that gives every rank the same local batch size (``drop_last``). A loss computed on the result
    must be multiplied by ``world_size`` before backward; see the module docstring for why.
    """
    tensors = (image_features, text_features, *extra)
    rank, world_size = world_info()
    if world_size == 1:
        return tensors
    gathered_all = []
    for local in tensors:
        # all_gather writes into fresh buffers and is not differentiable: those copies are constants.
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local.detach().contiguous())
        gathered[rank] = local
        gathered_all.append(torch.cat(gathered, dim=0))
    return tuple(gathered_all)
