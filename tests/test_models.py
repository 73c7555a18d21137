import time

import open_clip
import pytest
import torch

from clip_refine_lab.models.checkpoints import ModelSpec, read_checkpoint_meta, save_checkpoint
from clip_refine_lab.models.loading import ModelNotAvailableError, load_model, tiny_architectures


def test_tiny_architectures_are_open_clip_models():
    load_model("micro-vit-32")  # registers them
    for arch in tiny_architectures():
        assert arch in open_clip.list_models()


def test_checkpoint_reloads_in_plain_open_clip_with_identical_features(tmp_path):
    torch.manual_seed(0)
    loaded = load_model("micro-vit-32")
    path = save_checkpoint(loaded.model, tmp_path / "m.safetensors", loaded.spec)
    meta = read_checkpoint_meta(path)
    assert meta["arch"] == "micro-vit-32" and meta["quick_gelu"] == "false"
    plain, _, _ = open_clip.create_model_and_transforms("micro-vit-32", pretrained=str(path))
    plain.eval()
    images = torch.randn(3, 3, 32, 32)
    tokens = open_clip.get_tokenizer("micro-vit-32")(["a red circle", "two blue stars", "a big square"])
    with torch.no_grad():
        assert torch.equal(plain.encode_image(images), loaded.model.encode_image(images))
        assert torch.equal(plain.encode_text(tokens), loaded.model.encode_text(tokens))
    # and through our loader, with the architecture read from the header
    again = load_model(str(path))
    assert again.spec.arch == "micro-vit-32"
    with torch.no_grad():
        assert torch.equal(again.model.encode_image(images), loaded.model.encode_image(images))


def test_quick_gelu_is_recorded_and_applied(tmp_path):
    loaded = load_model("micro-vit-32", quick_gelu=True)
    assert isinstance(loaded.model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    path = save_checkpoint(loaded.model, tmp_path / "q.safetensors", loaded.spec)
    assert read_checkpoint_meta(path)["quick_gelu"] == "true"
    again = load_model(str(path))
    assert again.spec.quick_gelu
    assert isinstance(again.model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)


def test_open_clip_name_points_plain_users_at_the_quickgelu_variant():
    assert ModelSpec("ViT-B-32", "openai", quick_gelu=True).open_clip_name == "ViT-B-32-quickgelu"
    assert ModelSpec("ViT-B-32", None, quick_gelu=False).open_clip_name == "ViT-B-32"


def test_uncached_pretrained_tag_fails_fast_offline():
    start = time.monotonic()
    with pytest.raises(ModelNotAvailableError) as err:
        load_model("ViT-B-32", "openai")
    assert time.monotonic() - start < 10
    text = str(err.value)
    assert "'ViT-B-32' with pretrained tag 'openai'" in text and "--pretrained /path/to" in text


def test_an_uncached_hf_hub_repository_fails_fast_offline():
    start = time.monotonic()
    with pytest.raises(ModelNotAvailableError, match="'hf-hub:nobody/nothing'.*not in the Hugging Face cache"):
        load_model("hf-hub:nobody/nothing")
    assert time.monotonic() - start < 10


def test_unknown_tag_and_missing_file_are_clear(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="nor a known pretrained tag of .micro-vit-32."):
        load_model("micro-vit-32", "laion9000")
    with pytest.raises(ModelNotAvailableError, match="checkpoint file not found"):
        load_model("micro-vit-32", str(tmp_path / "nope.safetensors"))
    with pytest.raises(ModelNotAvailableError, match="checkpoint file not found"):
        load_model(str(tmp_path / "nope.safetensors"))


def test_architecture_mismatch_is_refused(tmp_path):
    loaded = load_model("micro-vit-32")
    path = save_checkpoint(loaded.model, tmp_path / "m.safetensors", loaded.spec)
    with pytest.raises(ValueError, match="holds a 'micro-vit-32' model"):
        load_model("tiny-vit-48", str(path))


@pytest.mark.parametrize("arch", ["micro-vit-32", "tiny-rn-48"])
def test_sdpa_attention_matches_open_clip_outputs_and_gradients(arch):
    import copy

    from clip_refine_lab.models.speed import use_sdpa_attention

    torch.manual_seed(0)
    native = load_model(arch).model.train()
    fast = copy.deepcopy(native)
    n = use_sdpa_attention(fast)
    assert n == sum(type(m).__name__ == "SdpaResidualAttentionBlock" for m in fast.modules()) > 0
    assert list(fast.state_dict()) == list(native.state_dict())  # checkpoints are unchanged
    size = native.visual.image_size[0] if isinstance(native.visual.image_size, tuple) else native.visual.image_size
    images = torch.randn(4, 3, size, size)
    tokens = open_clip.get_tokenizer("micro-vit-32")(["a red circle", "two blue stars", "a big square", "a ring"])

    def loss_and_grads(model):
        model.zero_grad(set_to_none=True)
        fi, ft, scale = model(images, tokens)
        loss = open_clip.loss.ClipLoss()(fi, ft, scale)
        loss.backward()
        return fi.detach(), ft.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    fi_n, ft_n, g_n = loss_and_grads(native)
    fi_f, ft_f, g_f = loss_and_grads(fast)
    torch.testing.assert_close(fi_f, fi_n, rtol=0, atol=1e-6)
    torch.testing.assert_close(ft_f, ft_n, rtol=0, atol=1e-6)
    assert g_n.keys() == g_f.keys()
    largest = max(g.abs().max().item() for g in g_n.values())
    for k in g_n:
        assert (g_f[k] - g_n[k]).abs().max().item() <= 1e-5 * largest, k
    # a deep copy (the trainer's frozen teacher) keeps the fast path and its own parameters
    twin = copy.deepcopy(fast)
    assert type(twin.transformer.resblocks[0]).__name__ == "SdpaResidualAttentionBlock"
    assert twin.transformer.resblocks[0].attn.in_proj_weight is not fast.transformer.resblocks[0].attn.in_proj_weight


def test_channels_last_only_for_convolutional_towers():
    from clip_refine_lab.models.speed import use_channels_last

    assert use_channels_last(load_model("micro-vit-32").model) is False
    rn = load_model("tiny-rn-48").model
    assert use_channels_last(rn) is True
    conv = next(m for m in rn.visual.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("sdpa", [False, True])
def test_trimmed_text_encoding_matches_encode_text_and_its_gradients(sdpa):
    """The pre-training text forward drops trailing padding columns: same features and gradients as
    open_clip's encode_text over the full context (causal mask, pooling at the end-of-text token)."""
    import copy

    from clip_refine_lab.models.speed import encode_text_trimmed, use_sdpa_attention

    torch.manual_seed(0)
    model = load_model("micro-vit-32").model.train()
    if sdpa:
        use_sdpa_attention(model)
    tokens = open_clip.get_tokenizer("micro-vit-32")(["a red circle", "two blue stars left of a big yellow square", "a"])
    assert (tokens[:, -4:] == 0).all()  # there is padding to drop
    twin = copy.deepcopy(model)
    full, trimmed = model.encode_text(tokens), encode_text_trimmed(twin, tokens)
    torch.testing.assert_close(trimmed, full, rtol=0, atol=1e-5)
    full.square().sum().backward()
    trimmed.square().sum().backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    largest = max(g.abs().max().item() for g in grads.values())
    for k, p in twin.named_parameters():
        if k in grads:
            assert (p.grad - grads[k]).abs().max().item() <= 1e-5 * largest, k
    # a batch without padding columns to drop takes the same path as encode_text
    full_rows = torch.randint(1, 1000, (2, tokens.shape[1]))
    torch.testing.assert_close(encode_text_trimmed(model, full_rows), model.encode_text(full_rows))


@pytest.mark.parametrize("buckets", [2, 3, 8])
def test_length_bucketed_text_encoding_keeps_rows_in_order_with_the_same_features_and_gradients(buckets):
    """Pre-training encodes its text rows in length-sorted chunks (pretrain.TEXT_BUCKETS): each row's feature
    and the gradients must be those of encode_text, and row i of the output must be caption i's."""
    import copy

    from clip_refine_lab.models.speed import encode_text_trimmed, use_sdpa_attention

    torch.manual_seed(0)
    model = load_model("micro-vit-32").model.train()
    use_sdpa_attention(model)
    captions = ["two blue stars left of a big yellow square on a striped background", "a", "a red circle",
                "three shapes", "a small green ring in the top left", "a star above a ring", "blue"]
    tokens = open_clip.get_tokenizer("micro-vit-32")(captions)
    twin = copy.deepcopy(model)
    lookups = []
    twin.token_embedding.register_forward_hook(lambda module, args, out: lookups.append(out.shape))
    full, bucketed = model.encode_text(tokens), encode_text_trimmed(twin, tokens, buckets)
    torch.testing.assert_close(bucketed, full, rtol=0, atol=1e-5)
    # one lookup for all chunks: its backward writes a dense vocabulary-sized gradient (PRETRAIN_VERSION 5)
    assert len(lookups) == 1 and lookups[0][0] == len(captions)
    # rows in input order: each row matches its own caption encoded alone, not just some permutation
    for i in (0, 1, len(captions) - 1):
        torch.testing.assert_close(bucketed[i], model.encode_text(tokens[i:i + 1])[0], rtol=0, atol=1e-5)
    weights = torch.arange(1.0, len(captions) + 1)[:, None]  # a row-dependent loss: a permutation would show
    (weights * full).square().sum().backward()
    (weights * bucketed).square().sum().backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    largest = max(g.abs().max().item() for g in grads.values())
    for k, p in twin.named_parameters():
        if k in grads:
            assert (p.grad - grads[k]).abs().max().item() <= 1e-5 * largest, k


def test_the_embedded_tag_is_refused_with_the_way_to_resolve_it():
    # load_model never pre-trains: the caller resolves the tag (clip_refine_lab.embedded.base) first
    with pytest.raises(ModelNotAvailableError, match="resolve_pretrained.*ensure_base"):
        load_model("micro-vit-32", "embedded")

