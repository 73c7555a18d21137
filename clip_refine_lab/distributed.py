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

Sharding (``--fsdp``). PyTorch FSDP2 (``fully_shard``) shards every transformer block of both towers,
then the rest of the model, across the processes (:func:`shard_model`). Each rank still encodes its
own slice of the batch and gathers features as above; the gradient reduction is FSDP's
reduce-scatter, which averages like DDP's all-reduce, so the same x ``world_size`` rule gives each
rank its shard of the single-process gradient. FSDP cannot shard 0-dim parameters (the logit scale,
SigLIP's logit bias): they stay ordinary replicated tensors, and the trainer all-reduces their
gradients itself (:func:`replicated_parameters`), exactly as without sharding. Checkpoints of a
sharded model are ordinary full state dicts (:func:`model_state_dict`, :func:`optimizer_state_dict`:
the layout ``state_dict()`` of the unsharded model and optimiser has), and load back into a sharded
or an unsharded model alike.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .config import ConfigError

__all__ = ["resolve_device", "init_distributed_from_env", "world_info", "is_main_process", "gather_features",
           "shard_model", "is_sharded", "replicated_parameters", "model_state_dict", "load_model_state_dict",
           "optimizer_state_dict", "load_optimizer_state_dict"]


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


# ------------------------------------------------------------------------------------- sharding
# Names of the module lists that hold a tower's residual blocks: open_clip's transformers
# (``resblocks``), timm's ViTs (``blocks``), Hugging Face encoders (``layer``/``layers``).
BLOCK_LISTS = ("resblocks", "blocks", "layer", "layers")
# Model methods that run the towers: FSDP gathers the root's parameters around them as around forward.
FORWARD_METHODS = ("encode_image", "encode_text")


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The residual blocks of every tower, each one FSDP unit (the outermost block lists only)."""
    blocks: list[torch.nn.Module] = []
    lists: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") for outer in lists):
            continue
        if name.rsplit(".", 1)[-1] in BLOCK_LISTS and isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)):
            blocks.extend(module)
            lists.append(name)
    return blocks


def shard_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Shard ``model`` in place across the default process group with FSDP2 and return it.

    Each transformer block is one unit (its weights are gathered just before it runs and freed
    after), then the root takes the rest (embeddings, layer norms, projections). ``encode_image``
    and ``encode_text`` are registered as forward methods, so calling them gathers the root's
    parameters as ``forward`` would. 0-dim parameters stay replicated (FSDP refuses to shard them).
    Every rank must then run the same forwards: FSDP gathers weights collectively.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    scalars = {p for p in model.parameters() if p.ndim == 0}
    # the root too frees its gathered weights after each call: the state between calls is always sharded
    fully_shard(model, mesh=mesh, reshard_after_forward=True, ignored_params=scalars or None)
    for method in FORWARD_METHODS:
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    return model


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` has parameters sharded by :func:`shard_model`."""
    return any(_is_dtensor(p) for p in model.parameters())


def replicated_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable parameters whose gradients are not reduced by FSDP: all of them in an unsharded
    model, the 0-dim ones (logit scale, logit bias) in a sharded one."""
    return [p for p in model.parameters() if p.requires_grad and not _is_dtensor(p)]


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()``; for a sharded model the full state dict, gathered on every rank (a
    collective: call it on all of them) and held on rank 0's CPU (the other ranks get ``{}``)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options(cpu_offload=True))


def load_model_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (as :func:`model_state_dict` writes it) into ``model``, sharded or not;
    every rank passes the whole dict and keeps its own shard."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_full_options())


def _parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter of ``optimizer``, in the order ``optimizer.state_dict()`` numbers them."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()``; for a sharded model the full one, gathered like
    :func:`model_state_dict` (rank 0 holds it) and laid out as an unsharded optimiser's: states and
    parameter groups keyed by each parameter's position, not its name."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    if not full:
        return {}
    position = {name: i for i, name in enumerate(_parameter_names(model, optimizer))}
    return {"state": {position[name]: s for name, s in full["state"].items()},
            "param_groups": [{**g, "params": [position[name] for name in g["params"]]} for g in full["param_groups"]]}


def load_optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an ordinary optimiser state dict (as :func:`optimizer_state_dict` writes it) into
    ``optimizer``; for a sharded model every rank passes the whole dict and keeps its shards."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _parameter_names(model, optimizer)
    by_name = {"state": {names[i]: s for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    # A parameter that never had a gradient (the logit scale of a loss that does not use it) has no
    # state in the file, which the loader must accept; the placeholder state the loader makes for it
    # is dropped, so that AdamW starts it afresh as the unsharded optimiser would.
    set_optimizer_state_dict(model, optimizer, by_name, options=_full_options(strict=False))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, p in enumerate(params):
        if i not in state["state"]:
            optimizer.state.pop(p, None)


def average_gradients(params: list, device: torch.device, world_size: int) -> None:
    """Average ``params``' gradients over the processes (one flat all-reduce), as DDP would.

    A parameter may have a gradient on some ranks only (the logit scale: rank 0 carries it), so it
    gets zeros where it has none; one that no rank touched keeps grad None, so AdamW skips it exactly
    as in a single process."""
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    for p, flag in zip(params, has_grad.tolist()):
        if flag and p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world_size
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)
