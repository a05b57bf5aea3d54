"""NF4 / int8 block-wise quantization (minimm/quant.py) and a QLoRA step on a tiny GPT."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minimm.gpt import GPT, GPTConfig
from minimm.lora import LoRALinear, apply_lora
from minimm.quant import (BLOCK_SIZE, INT8_MAX, NF4_LEVELS, NF4_MAX_HALF_GAP, QuantLinear, dequantize_int8,
                          dequantize_nf4, memory_report, quantize_int8, quantize_nf4)

# Appendix E of the QLoRA paper (https://arxiv.org/abs/2305.14314), typed in as the reference.
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                 -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]

SHAPES = [(37, 91), (5, 13), (130,), (3, 7, 11), (64, 64), (1, 1)]


def test_nf4_levels_match_the_published_table():
    assert NF4_LEVELS.shape == (16,)
    torch.testing.assert_close(NF4_LEVELS, torch.tensor(PUBLISHED_NF4), atol=1e-4, rtol=0)
    assert (NF4_LEVELS[1:] > NF4_LEVELS[:-1]).all()
    assert (NF4_LEVELS > 0).sum() == 8 and (NF4_LEVELS < 0).sum() == 7 and (NF4_LEVELS == 0).sum() == 1


def _block_absmax(w: torch.Tensor) -> torch.Tensor:
    """The absmax of the block each element of w belongs to, in w's shape."""
    flat = w.reshape(-1)
    padded = F.pad(flat, (0, -flat.numel() % BLOCK_SIZE)).view(-1, BLOCK_SIZE)
    absmax = padded.abs().amax(dim=1)
    return absmax.repeat_interleave(BLOCK_SIZE)[:flat.numel()].view(w.shape)


@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_error_within_documented_bound(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.rand(shape) * 3  # blocks with different scales
    q = quantize_nf4(w)
    n_blocks = -(-w.numel() // BLOCK_SIZE)
    assert q.codes.dtype == torch.uint8 and q.codes.numel() == n_blocks * BLOCK_SIZE // 2
    assert q.absmax.shape == (n_blocks,)
    restored = dequantize_nf4(q)
    assert restored.shape == w.shape and restored.dtype == torch.float32
    bound = _block_absmax(w) * NF4_MAX_HALF_GAP * (1 + 1e-5) + 1e-7
    assert ((w - restored).abs() <= bound).all()
    # the largest element of each block is exact (it normalizes to +-1, which are levels)
    flat, back = w.reshape(-1), restored.reshape(-1)
    i = flat.abs().argmax()
    torch.testing.assert_close(back[i], flat[i])


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_error_within_documented_bound(shape):
    torch.manual_seed(1)
    w = torch.randn(shape) * torch.rand(shape) * 3
    q = quantize_int8(w)
    assert q.codes.dtype == torch.int8 and int(q.codes.abs().max()) <= INT8_MAX
    restored = dequantize_int8(q)
    assert restored.shape == w.shape
    bound = _block_absmax(w) / (2 * INT8_MAX) * (1 + 1e-5) + 1e-7
    assert ((w - restored).abs() <= bound).all()


def test_nf4_bound_is_tight_and_zero_blocks_stay_zero():
    # a value halfway between -1 and the next level costs the full half-gap: the bound is not loose
    mid = float(NF4_LEVELS[0] + NF4_LEVELS[1]) / 2
    w = torch.tensor([1.0, mid + 1e-4] + [0.0] * 70)  # second block all zeros
    restored = dequantize_nf4(quantize_nf4(w))
    assert abs(float(w[1] - restored[1])) > 0.99 * NF4_MAX_HALF_GAP
    assert (restored[BLOCK_SIZE:] == 0).all() and restored[0] == 1.0


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quant_linear_equals_linear_with_dequantized_weight(kind):
    torch.manual_seed(2)
    linear = nn.Linear(45, 23)
    q = QuantLinear.from_linear(linear, kind)
    x = torch.randn(3, 5, 45)
    expected = F.linear(x, q.dequantized_weight(), linear.bias)
    torch.testing.assert_close(q(x), expected, atol=0, rtol=0)
    assert not any(p.requires_grad for p in q.parameters())
    # codes and scales travel with the state_dict
    fresh = QuantLinear(45, 23, kind=kind)
    fresh.load_state_dict(q.state_dict())
    torch.testing.assert_close(fresh(x), q(x), atol=0, rtol=0)
    assert set(q.state_dict()) == {"codes", "absmax", "bias"}


def test_memory_ratio():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(96, 200), nn.Linear(200, 72, bias=False))
    nf4 = nn.Sequential(*[QuantLinear.from_linear(m, "nf4") for m in model])
    int8 = nn.Sequential(*[QuantLinear.from_linear(m, "int8") for m in model])
    report = memory_report(nf4)
    fp32 = sum(p.numel() * 4 for p in model.parameters())
    assert report["fp32_bytes"] == fp32 and report["layers"] == 2
    assert report["ratio"] <= 0.3
    assert 0.14 <= report["ratio"] <= 0.16  # 0.5625 / 4 plus the fp32 bias
    assert memory_report(int8)["ratio"] <= 0.3
    assert memory_report(int8)["ratio"] > report["ratio"]
    with pytest.raises(ValueError):
        memory_report(model)


def test_qlora_steps_lower_the_loss():
    torch.manual_seed(4)
    model = GPT(GPTConfig(vocab_size=67, block_size=24, n_layer=2, n_head=3, n_embd=36))
    idx = torch.randint(0, 67, (3, 21))
    targets = torch.roll(idx, -1, dims=1)
    with torch.no_grad():
        _, base_loss = model(idx, targets)
    apply_lora(model, ["attn.c_attn", "mlp.c_fc", "mlp.c_proj"], r=4, alpha=8, quantize="nf4")
    adapted = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(adapted) == 6 and all(isinstance(m.base, QuantLinear) for m in adapted)
    assert memory_report(model)["ratio"] <= 0.3
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    with torch.no_grad():
        _, first = model(idx, targets)
    # NF4 rounding moves the loss a little, but the model is still the base model
    assert abs(float(first) - float(base_loss)) < 0.05
    codes = [m.base.codes.clone() for m in adapted]
    for _ in range(15):
        _, loss = model(idx, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        _, last = model(idx, targets)
    assert float(last) < float(first) - 0.3
    assert all(torch.equal(c, m.base.codes) for c, m in zip(codes, adapted))  # the base never changes
