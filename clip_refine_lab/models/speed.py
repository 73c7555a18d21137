"""Speed options for open_clip models that keep their parameters, state-dict keys and arithmetic.

SDPA attention and the trimmed text encode give the same features up to float summation order
(tests/test_models.py); frozen batch norm, channels-last and ``torch.compile`` change how a model runs,
not what it holds.
"""

from __future__ import annotations

import torch

_SDPA_BLOCK = None


def _sdpa_block_class():
    """A subclass of open_clip's ``ResidualAttentionBlock`` whose self-attention calls SDPA batch-first.

    ``nn.MultiheadAttention`` works sequence-first: with open_clip's ``batch_first=True`` it transposes
    its input, splits the packed q/k/v projection through ``unflatten/transpose/contiguous`` and
    ``select`` (whose backward zero-fills and copies a 3x buffer) and transposes back. On CPU those
    copies were about 17% of a tiny-vit-48 training step (benchmarks/RESULTS.md). This path does the
    same arithmetic with the same parameters in one ``view/permute``; forward outputs are equal to
    open_clip's and gradients agree to float summation order (tests/test_models.py).
    """
    global _SDPA_BLOCK
    if _SDPA_BLOCK is not None:
        return _SDPA_BLOCK
    import torch.nn.functional as F
    from open_clip.transformer import ResidualAttentionBlock

    class SdpaResidualAttentionBlock(ResidualAttentionBlock):
        def attention(self, q_x, k_x=None, v_x=None, attn_mask=None):
            mha = self.attn
            if k_x is not None or v_x is not None or not mha.batch_first or not mha._qkv_same_embed_dim \
                    or mha.in_proj_weight is None:
                return super().attention(q_x, k_x, v_x, attn_mask)  # cross-attention etc.: open_clip's path
            batch, length, width = q_x.shape
            heads = mha.num_heads
            qkv = F.linear(q_x, mha.in_proj_weight, mha.in_proj_bias)
            q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
            mask = attn_mask.to(q_x.dtype) if attn_mask is not None else None  # additive, as open_clip passes it
            if mask is not None and mask.dim() == 3:  # per-row masks (padding masks) come as (batch*heads, L, L)
                mask = mask.view(batch, heads, length, mask.shape[-1])
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                 dropout_p=mha.dropout if self.training else 0.0)
            out = out.transpose(1, 2).reshape(batch, length, width)
            return F.linear(out, mha.out_proj.weight, mha.out_proj.bias)

    _SDPA_BLOCK = SdpaResidualAttentionBlock
    return _SDPA_BLOCK


def use_sdpa_attention(model: torch.nn.Module) -> int:
    """Switch every open_clip ``ResidualAttentionBlock`` of ``model`` to the SDPA path, in place.

    Only the class of each block changes: parameters, state-dict keys and checkpoints stay the same,
    and ``copy.deepcopy`` copies the switched blocks. Returns the number of blocks switched."""
    from open_clip.transformer import ResidualAttentionBlock

    cls = _sdpa_block_class()
    n = 0
    for module in model.modules():
        if type(module) is ResidualAttentionBlock:
            module.__class__ = cls
            n += 1
    return n


def encode_text_trimmed(model: torch.nn.Module, text: torch.Tensor, buckets: int = 1) -> torch.Tensor:
    """``model.encode_text(text)``, with the padding columns after the batch's longest caption left out.

    ``buckets`` > 1 sorts the rows by caption length and encodes them in that many chunks, each trimmed to
    its own longest caption: the text tower's cost then follows the captions' lengths instead of the batch's
    longest (web alt-text: 13 tokens on average, 26 for the longest of 256). Every row is still encoded on
    its own (attention never mixes rows, layer norm is per token), so the features are the same up to float
    summation order, and the rows come back in their input order.

    open_clip's CLIP text tower runs under a causal mask and pools at the end-of-text token (``argmax``/
    ``eos``) or the first one, so no output it pools depends on a later column: dropping the trailing
    columns that are padding (token 0) in every row gives the same features up to float summation order, at
    the cost of the captions actually present (web alt-text averages 13 of the tiny models' 32 tokens).
    Other text towers take the plain ``encode_text``: without a causal mask every position sees the padding
    after it, and ``last`` pooling reads the final column itself, so trimming would change the features.
    SigLIP's text tower (a ``CustomTextCLIP``'s ``model.text``) is both."""
    from open_clip.model import CLIP
    from open_clip.transformer import text_global_pool

    used = (text != 0).any(0).nonzero()
    if (type(model) is not CLIP or model.attn_mask is None or getattr(model, "text_pool_type", None)
            not in ("argmax", "eos", "first") or len(used) == 0):
        return model.encode_text(text)
    cast_dtype = model.transformer.get_cast_dtype()

    def encode(tokens: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        n = int((tokens != 0).any(0).nonzero()[-1]) + 1 if tokens.any() else 1
        tokens = tokens[:, :n]
        x = embedded[:, :n].to(cast_dtype) + model.positional_embedding[:n].to(cast_dtype)
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
        x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
        if model.text_projection is not None:
            x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
        return x

    n = int(used[-1]) + 1
    text = text[:, :n]
    # One embedding lookup for all rows: its backward writes a dense vocabulary-sized gradient (6.3M floats for
    # the tiny models), so looking up each chunk apart would pay that once per chunk.
    embedded = model.token_embedding(text)
    if buckets <= 1 or len(text) <= 1:
        return encode(text, embedded)
    lengths = (text != 0).cumsum(1).argmax(1)  # index of each row's last token (0 for an empty row)
    order = lengths.argsort(stable=True)
    parts = [encode(text[rows], embedded[rows]) for rows in order.chunk(buckets)]
    return torch.cat(parts)[order.argsort()]


def train_with_frozen_batch_norm(model: torch.nn.Module) -> int:
    """``model.train()``, but every batch-norm layer keeps using (and no longer updates) its running statistics.

    Post-pre-training starts from a converged model and distils from a frozen copy of it: with batch
    statistics in train mode, a ModifiedResNet tower would compute different features than its eval-mode
    teacher from step 0 (Self-KD would not be zero there) and a few thousand pairs would overwrite running
    statistics estimated on the whole pre-training set. The affine weights still train. This is what
    open_clip's ``lock_image_tower(freeze_bn_stats=True)`` does for a locked tower. Returns how many layers
    it froze (0 for the ViTs, which have none).
    """
    model.train()
    frozen = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
            frozen += 1
    return frozen


def use_channels_last(model: torch.nn.Module) -> bool:
    """Channels-last memory format for a convolutional image tower (ModifiedResNet, ConvNeXt...).

    cuDNN's convolutions run fastest on NHWC tensors on recent GPUs; a ViT has a single patch
    convolution, so this only pays for conv towers. Returns whether the tower has convolutions."""
    visual = getattr(model, "visual", None)
    if visual is None:
        return False
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in visual.modules())
    if convs <= 1:
        return False
    visual.to(memory_format=torch.channels_last)
    return True


def compile_towers(model: torch.nn.Module) -> None:
    """``torch.compile`` the image and text towers in place (``nn.Module.compile``: state-dict keys unchanged).

    The text tower is CLIP's ``transformer`` or a ``CustomTextCLIP``'s (SigLIP's) ``text``. Worth it on GPU
    for long runs; the first steps pay the compilation (minutes for ViT-B-32). On a small CPU it measured
    slower than eager (benchmarks/RESULTS.md)."""
    for name in ("visual", "transformer", "text"):
        tower = getattr(model, name, None)
        if tower is not None:
            tower.compile()
