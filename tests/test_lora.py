"""LoRA adapters (minimm/lora.py): init, training only the adapters, merge, save/load, name patterns."""
import pytest
import torch
import torch.nn as nn

from minimm.audio import AudioEncoder, AudioEncoderConfig
from minimm.gpt import GPT, GPTConfig
from minimm.lora import (DEFAULT_TARGETS, LoRALinear, apply_lora, count_parameters, load_lora,
                         lora_state_dict, mark_trainable, merge_lora, save_lora, unmerge_lora)
from minimm.quant import QuantLinear
from minimm.vit import ViT, ViTConfig

CONFIG = GPTConfig(vocab_size=71, block_size=20, n_layer=2, n_head=3, n_embd=42)


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CONFIG)


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, CONFIG.vocab_size, (3, 17), generator=g)
    return idx, torch.roll(idx, -1, dims=1)


def train_steps(model: nn.Module, steps: int, lr: float = 1e-2) -> torch.optim.Optimizer:
    idx, targets = batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        _, loss = model(idx, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return optimizer


def test_init_leaves_outputs_unchanged():
    model = tiny_gpt()
    idx, targets = batch()
    before, _ = model(idx, targets)
    names = apply_lora(model, DEFAULT_TARGETS, r=5, alpha=10)
    after, _ = model(idx, targets)
    assert torch.equal(before, after)
    assert len(names) == 4 * CONFIG.n_layer
    assert "lm_head" not in names and not isinstance(model.lm_head, LoRALinear)
    layer = model.transformer.h[0].attn.c_attn
    assert layer.lora_A.shape == (5, 42) and layer.lora_B.shape == (3 * 42, 5) and layer.scale == 2.0
    assert layer.lora_A.abs().sum() > 0 and (layer.lora_B == 0).all()


def test_only_adapters_get_gradients_and_change():
    model = tiny_gpt()
    apply_lora(model, DEFAULT_TARGETS, r=4, alpha=4)
    adapters = {n for n, _ in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == adapters and len(adapters) == 2 * 4 * CONFIG.n_layer
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    idx, targets = batch()
    _, loss = model(idx, targets)
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in adapters), n
    model.zero_grad(set_to_none=True)

    optimizer = train_steps(model, steps=2)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for n, p in model.named_parameters() if n in adapters}
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == (n in adapters), n  # B moves at step 1, A from step 2 (B was zero before)


def test_lora_training_lowers_the_loss():
    model = tiny_gpt()
    apply_lora(model, DEFAULT_TARGETS, r=4, alpha=8)
    idx, targets = batch()
    with torch.no_grad():
        _, first = model(idx, targets)
    train_steps(model, steps=12)
    with torch.no_grad():
        _, last = model(idx, targets)
    assert float(last) < float(first) - 0.3


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_merge_unmerge_round_trip(quantize):
    model = tiny_gpt()
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    apply_lora(model, DEFAULT_TARGETS, r=3, alpha=6, quantize=quantize)
    train_steps(model, steps=3)
    idx, targets = batch(seed=7)
    with torch.no_grad():
        adapted, _ = model(idx, targets)
        codes = [m.codes.clone() for m in model.modules() if isinstance(m, QuantLinear)]
        merge_lora(model)
        merged, _ = model(idx, targets)
        unmerge_lora(model)
        unmerged, _ = model(idx, targets)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    assert torch.equal(unmerged, adapted)
    for n, m in model.named_modules():
        if isinstance(m, LoRALinear):
            assert not m.merged and m.original_weight is None and m.merged_weight is None
            if quantize is None:
                assert torch.equal(m.base.weight, originals[n])
    after = [m.codes for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(after) == (0 if quantize is None else 4 * CONFIG.n_layer)
    assert all(torch.equal(a, b) for a, b in zip(after, codes))


def test_merge_folds_update_into_plain_base_weight():
    model = tiny_gpt()
    apply_lora(model, ["mlp.c_fc"], r=2, alpha=2)
    train_steps(model, steps=2)
    layer = model.transformer.h[1].mlp.c_fc
    expected = layer.base.weight.detach() + layer.lora_B.detach() @ layer.lora_A.detach() * layer.scale
    merge_lora(model)
    torch.testing.assert_close(layer.base.weight.detach(), expected, atol=0, rtol=0)
    assert "original_weight" not in "".join(model.state_dict())  # the kept copy is never saved


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_save_and_load_into_fresh_model(tmp_path, quantize):
    model = tiny_gpt()
    apply_lora(model, ["attn.c_attn", "mlp.c_proj"], r=3, alpha=5, quantize=quantize)
    train_steps(model, steps=3)
    path = tmp_path / "lora.pt"
    save_lora(str(path), model)
    assert [p.name for p in tmp_path.iterdir()] == ["lora.pt"]  # no temporary file left behind

    state = torch.load(path, weights_only=True)
    assert state["config"]["r"] == 3 and state["config"]["quantize"] == quantize
    assert all(n.endswith((".lora_A", ".lora_B")) for n in state["tensors"])

    fresh = tiny_gpt()  # same base weights (same seed), no LoRA yet
    loaded = load_lora(fresh, str(path))
    assert sorted(loaded) == sorted(state["tensors"])
    idx, targets = batch(seed=3)
    with torch.no_grad():
        expected, _ = model(idx, targets)
        got, _ = fresh(idx, targets)
    assert torch.equal(got, expected)
    assert count_parameters(fresh) == count_parameters(model)


def test_load_is_strict():
    model = tiny_gpt()
    apply_lora(model, ["attn.c_attn"], r=2, alpha=2)
    state = lora_state_dict(model)
    other = tiny_gpt()
    apply_lora(other, ["attn.c_attn", "mlp.c_fc"], r=2, alpha=2)
    with pytest.raises(ValueError, match="missing .*mlp.c_fc"):
        load_lora(other, state)
    wrong_rank = tiny_gpt()
    apply_lora(wrong_rank, ["attn.c_attn"], r=3, alpha=2)
    with pytest.raises(ValueError, match="shape"):
        load_lora(wrong_rank, state)


class ToyBlock(nn.Module):
    """Stands in for a ViT / audio encoder block: the GPT's submodule names."""

    def __init__(self, dim: int):
        super().__init__()
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(dim, 3 * dim)
        self.attn.c_proj = nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(dim, 4 * dim)
        self.mlp.c_proj = nn.Linear(4 * dim, dim)


class ToyMultimodal(nn.Module):
    def __init__(self):
        super().__init__()
        self.gpt = tiny_gpt()
        self.vision = nn.Module()
        self.vision.patch_embed = nn.Linear(27, 30)
        self.vision.blocks = nn.ModuleList([ToyBlock(30) for _ in range(3)])
        self.audio = nn.Module()
        self.audio.blocks = nn.ModuleList([ToyBlock(18) for _ in range(2)])
        self.image_projector = nn.Sequential(nn.Linear(30, 42), nn.GELU(), nn.Linear(42, 42))
        self.audio_projector = nn.Module()  # same submodule names as a block: excluded by default anyway
        self.audio_projector.mlp = nn.Module()
        self.audio_projector.mlp.c_fc = nn.Linear(18, 42)


def test_patterns_cover_gpt_vision_and_audio_blocks_but_not_projectors():
    model = ToyMultimodal()
    names = apply_lora(model, DEFAULT_TARGETS, r=2, alpha=4)
    assert len(names) == 4 * (CONFIG.n_layer + 3 + 2)
    assert {n.split(".")[0] for n in names} == {"gpt", "vision", "audio"}
    assert "vision.blocks.2.mlp.c_proj" in names and "audio.blocks.1.attn.c_attn" in names
    assert not any("projector" in n or "lm_head" in n or "patch_embed" in n for n in names)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "projector" in n)

    unfrozen = mark_trainable(model, "projector")
    assert len(unfrozen) == 6 and all("projector" in n for n in unfrozen)
    assert model.lora_config["trainable"] == ["projector"]
    state = lora_state_dict(model)
    assert set(unfrozen) <= set(state["tensors"])
    fresh = ToyMultimodal()
    load_lora(fresh, state)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(state["tensors"])
    with pytest.raises(ValueError, match="no parameter"):
        mark_trainable(model, "no_such_module")


def test_default_targets_cover_the_real_vit_and_audio_encoder():
    vit = ViT(ViTConfig(image_size=24, patch_size=8, n_layer=2, n_head=3, n_embd=30))
    audio = AudioEncoder(AudioEncoderConfig(n_mels=20, n_embd=18, n_layer=3, n_head=3, max_frames=41))
    for encoder, n_layer in ((vit, 2), (audio, 3)):
        names = apply_lora(encoder, DEFAULT_TARGETS, r=2, alpha=2)
        assert len(names) == 4 * n_layer and all(n.startswith("blocks.") for n in names)
    images = torch.randn(2, 3, 24, 24)
    before = vit(images)
    merge_lora(vit)  # B is still zero: merging must not change anything either
    torch.testing.assert_close(vit(images), before, atol=1e-6, rtol=0)


def test_regex_patterns_and_tied_head():
    model = tiny_gpt()
    names = apply_lora(model, [r"^transformer\.h\.1\..*c_proj$"], r=2, alpha=2)
    assert names == ["transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"]
    with pytest.raises(ValueError, match="lm_head"):  # the only match is tied: nothing to adapt
        apply_lora(tiny_gpt(), ["lm_head"], r=2, alpha=2)
    with pytest.raises(RuntimeError, match="already"):
        apply_lora(model, DEFAULT_TARGETS, r=2, alpha=2)


def test_no_match_raises_and_lists_linears():
    with pytest.raises(ValueError, match="transformer.h.0.attn.c_attn"):
        apply_lora(tiny_gpt(), ["q_proj", "v_proj"], r=2, alpha=2)
    with pytest.raises(ValueError, match="quantize"):
        apply_lora(tiny_gpt(), DEFAULT_TARGETS, r=2, alpha=2, quantize="fp3")


def test_count_parameters():
    model = tiny_gpt()
    total = model.num_params(non_embedding=False)
    assert count_parameters(model) == (total, total)
    apply_lora(model, ["attn.c_attn", "mlp.c_fc"], r=3, alpha=3)
    C, L = CONFIG.n_embd, CONFIG.n_layer
    adapters = L * (3 * (C + 3 * C) + 3 * (C + 4 * C))
    assert count_parameters(model) == (adapters, total + adapters)
    quantized = tiny_gpt()
    apply_lora(quantized, ["attn.c_attn", "mlp.c_fc"], r=3, alpha=3, quantize="nf4")
    assert count_parameters(quantized) == (adapters, total + adapters)
