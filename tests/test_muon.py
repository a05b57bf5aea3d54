"""minimm/muon.py: the orthogonalization, the Muon step, the AdamW half, and which parameters get which."""
import copy
import math

import pytest
import torch

from minimm.gpt import GPT, GPTConfig
from minimm.muon import RMS_MATCH, Muon, orthogonalize
from minimm.training import configure_optimizer, cpu_has_fast_bf16


@pytest.mark.parametrize("shape", [(37, 91), (91, 37), (50, 50)])
def test_orthogonalize_keeps_the_singular_vectors_and_evens_out_the_values(shape):
    """U^T X V is diagonal (the directions are g's own) with entries in [0.6, 1.25], though g's singular values
    span a factor 30. Newton-Schulz in five steps is approximate, hence the band and not exactly 1."""
    torch.manual_seed(0)
    r = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], r))
    v, _ = torch.linalg.qr(torch.randn(shape[1], r))
    s = torch.logspace(0, -1.5, r)
    g = u @ torch.diag(s) @ v.T  # (out, in)
    x = orthogonalize(g)
    assert x.shape == g.shape
    core = u.T @ x @ v  # (r, r)
    diag = torch.diagonal(core)
    assert (core - torch.diag(diag)).abs().max() < 1e-3
    assert diag.min() > 0.6 and diag.max() < 1.25
    # scale does not matter: the input is normalized first
    torch.testing.assert_close(orthogonalize(1e3 * g), x, atol=1e-4, rtol=1e-4)


def test_first_muon_step_is_the_scaled_orthogonalized_gradient():
    """Momentum starts at zero, so the first Nesterov direction is a multiple of the gradient; orthogonalize
    ignores the multiple: p <- p (1 - lr wd) - lr 0.2 sqrt(max(out, in)) orthogonalize(grad)."""
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(13, 29))
    before = p.detach().clone()
    p.grad = torch.randn(13, 29)
    lr, wd = 0.01, 0.1
    Muon([{"params": [p], "muon": True, "weight_decay": wd}], lr=lr).step()
    expected = before * (1 - lr * wd) - lr * RMS_MATCH * math.sqrt(29) * orthogonalize(p.grad)
    torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=1e-5)


def test_matrices_of_one_shape_are_orthogonalized_together_as_each_alone():
    """step() stacks the matrices of one shape (a tall one turned wide) into one batched Newton-Schulz; each
    result equals orthogonalize of that matrix alone, with its own group's lr and weight decay. Two steps,
    so the momentum buffers count too; atol 1e-5: a batched matmul may round differently from a single one."""
    torch.manual_seed(3)
    shapes = [(13, 29), (29, 13), (13, 29), (8, 8)]
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    groups = [{"params": params[:2], "muon": True, "weight_decay": 0.1, "lr": 0.01},
              {"params": params[2:], "muon": True, "weight_decay": 0.0, "lr": 0.03}]
    opt = Muon(groups, lr=0.01)
    expected = [p.detach().clone() for p in params]
    buffers = [torch.zeros(shape) for shape in shapes]
    for _ in range(2):
        grads = [torch.randn(shape) for shape in shapes]
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = g.clone()
            lr, wd = (0.01, 0.1) if i < 2 else (0.03, 0.0)
            buffers[i] = 0.95 * buffers[i] + 0.05 * g
            nesterov = 0.05 * g + 0.95 * buffers[i]
            expected[i] = (expected[i] * (1 - lr * wd)
                           - lr * RMS_MATCH * math.sqrt(max(p.shape)) * orthogonalize(nesterov))
        opt.step()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, atol=1e-5, rtol=1e-4)
    stack = torch.randn(3, 13, 29)  # orthogonalize itself takes a stack: (N, out, in)
    torch.testing.assert_close(orthogonalize(stack), torch.stack([orthogonalize(m) for m in stack]),
                               atol=1e-5, rtol=1e-4)


def test_the_adamw_groups_step_exactly_as_torch_adamw():
    """The non-Muon half is AdamW written out: five steps equal torch.optim.AdamW's to float32 rounding."""
    torch.manual_seed(2)
    ours = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(11))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    groups = lambda ps: [{"params": [ps[0]], "weight_decay": 0.1}, {"params": [ps[1]], "weight_decay": 0.0}]
    mine = Muon(groups(ours), lr=3e-3, betas=(0.9, 0.95))
    ref = torch.optim.AdamW(groups(theirs), lr=3e-3, betas=(0.9, 0.95))
    for _ in range(5):
        grads = [torch.randn_like(p) for p in ours]
        for a, b, g in zip(ours, theirs, grads):
            a.grad, b.grad = g.clone(), g.clone()
        mine.step()
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_configure_optimizer_gives_muon_the_linear_weights_only():
    """Attention, MLP and smear Linears go to Muon; the tied token embedding (also the output head), the
    position table and the norm gains stay with AdamW; every trainable parameter is in exactly one group."""
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, pos_emb="learned",
                          smear=True))
    opt = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu", optimizer="muon")
    assert isinstance(opt, Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"]}
    adam = {names[id(p)] for g in opt.param_groups if not g["muon"] for p in g["params"]}
    assert muon == {n for n in names.values() if n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight",
                                                               "smear.weight"))}
    assert "transformer.wte.weight" in adam and "transformer.wpe.weight" in adam
    assert muon.isdisjoint(adam) and muon | adam == set(names.values())
    assert isinstance(configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu"), torch.optim.AdamW)
    with pytest.raises(ValueError, match="'adamw' or 'muon'"):
        configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu", optimizer="sgd")


def test_muon_trains_a_small_gpt_and_its_state_round_trips():
    """A few Muon steps lower the loss of a tiny GPT on a fixed batch; a state_dict loaded into a fresh
    optimizer continues exactly as the original does."""
    torch.manual_seed(3)
    cfg = GPTConfig(vocab_size=40, block_size=12, n_layer=1, n_head=2, n_embd=16)
    model = GPT(cfg)
    x = torch.randint(0, 40, (4, 12))
    y = torch.roll(x, -1, dims=1)
    opt = configure_optimizer(model, 0.0, 3e-2, (0.9, 0.95), "cpu", optimizer="muon")

    def step(m, o):
        o.zero_grad()
        _, loss = m(x, y)
        loss.backward()
        o.step()
        return loss.item()

    first = step(model, opt)
    for _ in range(10):
        last = step(model, opt)
    assert last < first - 0.5
    twin = GPT(cfg)
    twin.load_state_dict(model.state_dict())
    twin_opt = configure_optimizer(twin, 0.0, 3e-2, (0.9, 0.95), "cpu", optimizer="muon")
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # as a checkpoint would: no shared tensors
    step(model, opt)
    step(twin, twin_opt)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("amx, avx512_bf16, fast", [(False, False, False), (True, False, True),
                                                     (False, True, True), (True, True, True)])
def test_cpu_bf16_probe_picks_the_newton_schulz_dtype(monkeypatch, amx, avx512_bf16, fast):
    """Either CPU feature (Intel AMX, or AVX-512 BF16 as on AMD Zen 4) counts as bf16 in hardware; then Muon
    orthogonalizes in bf16 on the CPU, otherwise in fp32 (config/mixed.py picks its dtype by the same probe)."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert cpu_has_fast_bf16() is fast
    model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16))
    opt = configure_optimizer(model, 0.0, 1e-3, (0.9, 0.95), "cpu", optimizer="muon")
    assert opt.ns_dtype == (torch.bfloat16 if fast else torch.float32)
