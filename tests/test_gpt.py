import pytest
import torch
import torch.nn.functional as F

from minimm import ops
from minimm.gpt import GPT, GPTConfig, KVCache


def tiny(pos_emb="rope", **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=101, block_size=48, n_layer=2, n_head=3, n_embd=36, pos_emb=pos_emb, **kw))


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
def test_shapes_and_loss_equals_f_cross_entropy(pos_emb):
    model = tiny(pos_emb)
    idx = torch.randint(0, 101, (3, 29))
    targets = torch.randint(0, 101, (3, 29))
    targets[0, :5] = -100
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 29, 101)
    ref = F.cross_entropy(logits.view(-1, 101), targets.view(-1), ignore_index=-100)
    torch.testing.assert_close(loss, ref)
    logits, none = model(idx)
    assert logits.shape == (3, 1, 101) and none is None
    _, per_token = model(idx, targets, reduction="none")
    assert per_token.shape == (3, 29) and (per_token[0, :5] == 0).all()


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_head_at_supervised_positions_only_gives_the_same_loss_and_grads(reduction):
    """return_logits=False runs the head only where a target exists; nothing else may change."""
    model = tiny()
    idx = torch.randint(0, 101, (3, 23))
    targets = torch.randint(0, 101, (3, 23))
    targets[0] = -100  # a row with no target at all
    targets[1, ::2] = -100

    def loss_and_grads(return_logits: bool):
        model.zero_grad()
        logits, loss = model(idx, targets, reduction=reduction, return_logits=return_logits)
        loss.sum().backward()
        return logits, loss.detach(), [p.grad.clone() for p in model.parameters()]

    logits, full, full_grads = loss_and_grads(True)
    none, kept, kept_grads = loss_and_grads(False)
    assert logits.shape == (3, 23, 101) and none is None
    assert kept.shape == full.shape
    # the same rows go through the same ops; only the matmul's blocking over fewer rows may differ
    torch.testing.assert_close(kept, full, rtol=1e-6, atol=1e-6)
    for a, b in zip(kept_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_inputs_embeds_equals_ids():
    model = tiny()
    idx = torch.randint(0, 101, (2, 17))
    a, _ = model(idx, idx)
    b, _ = model(inputs_embeds=model.transformer.wte(idx), targets=idx)
    torch.testing.assert_close(a, b)


def test_overfits_a_tiny_batch():
    model = tiny()
    idx = torch.randint(0, 101, (4, 24))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_cpu_bf16_autocast_matches_float32_and_trains():
    """dtype=bfloat16 on a CPU (config/mixed.py where the CPU has bf16): the linears run in bf16, attention in fp32.
    The loss and gradients stay close to fp32 (bf16 keeps 8 bits of mantissa, ~0.4% relative error per
    product; summed over many they mostly cancel: here the loss moves by ~2e-5 and each gradient's
    direction by a cosine of ~0.99998, so the bounds 2e-3 and 0.999 leave room), and training still fits."""
    model = tiny()
    idx = torch.randint(0, 101, (4, 24))
    seg = torch.tensor([[0] * 10 + [1] * 13] * 4)

    def loss_and_grads(autocast: bool):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _, loss = model(idx[:, :-1], idx[:, 1:], segment_ids=seg)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss32, grads32 = loss_and_grads(False)
    loss16, grads16 = loss_and_grads(True)
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(loss16, loss32, rtol=2e-3, atol=0)
    for a, b in zip(grads16, grads32):
        assert a.dtype == torch.float32 and F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(idx[:, :-1], idx[:, 1:], segment_ids=seg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
def test_greedy_with_kv_cache_equals_without(pos_emb):
    model = tiny(pos_emb).eval()
    idx = torch.randint(0, 101, (2, 9))
    with_cache = model.generate(idx, 30, temperature=0)
    without = model.generate(idx, 30, temperature=0, use_cache=False)
    assert torch.equal(with_cache, without)
    assert with_cache.shape == (2, 39)


@pytest.mark.parametrize("smear", [1, 2])
def test_smear_adds_the_previous_inputs_and_keeps_examples_and_the_cache_apart(smear):
    plain, smeared = tiny().eval(), tiny(smear=smear).eval()
    maps = [smeared.smear_map(back).weight for back in range(1, smear + 1)]
    assert all(w.abs().sum() == 0 for w in maps)  # starts as the plain GPT
    smeared.load_state_dict(plain.state_dict(), strict=False)
    idx = torch.randint(0, 101, (2, 17))
    torch.testing.assert_close(smeared(idx, idx)[0], plain(idx, idx)[0], rtol=0, atol=0)
    for w in maps:
        torch.nn.init.normal_(w, std=0.3)
    # each input is x_t + W1 x_(t-1) (+ W2 x_(t-2)), x_(-1) = x_(-2) = 0
    x = smeared.transformer.wte(idx)  # (2, 17, C)
    expected = x.clone()
    for back, w in enumerate(maps, start=1):
        shifted = torch.cat([torch.zeros_like(x[:, :back]), x[:, :-back]], dim=1)
        expected = expected + shifted @ w.T
    torch.testing.assert_close(smeared.smear_previous(x, None, None), expected)
    # packed rows: the second example's outputs do not depend on the first example's tokens
    seg = torch.tensor([[0] * 7 + [1] * 10] * 2)
    other = idx.clone()
    other[:, :7] = torch.randint(0, 101, (2, 7))
    a, b = smeared(idx, idx, segment_ids=seg)[0], smeared(other, other, segment_ids=seg)[0]
    torch.testing.assert_close(a[:, 7:], b[:, 7:], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 6:], b[:, 6:])  # ... while the first example's own outputs do
    # generation: the KV cache carries the last inputs over to the next steps
    with_cache = smeared.generate(idx[:, :9], 30, temperature=0)
    assert torch.equal(with_cache, smeared.generate(idx[:, :9], 30, temperature=0, use_cache=False))
    cache = KVCache(smeared.config, 2, idx.device, torch.float32)
    smeared(idx[:, :9], kv_cache=cache)
    for t in (9, 10):  # one position at a time: its previous inputs from the cache, then one from each
        step, _ = smeared(idx[:, t:t + 1], kv_cache=cache)  # (2, 1, V)
        torch.testing.assert_close(step, smeared(idx[:, :t + 1])[0], rtol=1e-5, atol=1e-5)
    cache = KVCache(smeared.config, 2, idx.device, torch.float32)
    smeared(idx[:, :1], kv_cache=cache)  # a one-token prompt: nothing two back yet
    step, _ = smeared(idx[:, 1:2], kv_cache=cache)
    torch.testing.assert_close(step, smeared(idx[:, :2])[0], rtol=1e-5, atol=1e-5)


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    normed, plain = tiny(qk_norm=True).eval(), tiny().eval()
    C = normed.config.n_embd
    idx = torch.randint(0, 101, (2, 23))
    # per head, q and k are scaled to RMS 1 before the dot product: scaling c_attn's q and k rows (and biases)
    # changes nothing; without qk_norm the same change sharpens every attention pattern
    outputs = []
    for model in (normed, plain):
        before = model(idx, idx)[0]
        with torch.no_grad():
            for block in model.transformer.h:
                block.attn.c_attn.weight[:2 * C] *= 7.0
                block.attn.c_attn.bias[:2 * C] *= 7.0
        outputs.append((before, model(idx, idx)[0]))
    torch.testing.assert_close(outputs[0][1], outputs[0][0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(outputs[1][1], outputs[1][0], rtol=1e-3, atol=1e-3)
    # the gains are the only new parameters: one per head channel, shared by the heads
    names = {n for n, _ in normed.named_parameters()} - {n for n, _ in plain.named_parameters()}
    assert names == {f"transformer.h.{i}.attn.{w}_norm.weight" for i in range(2) for w in "qk"}
    with torch.no_grad():  # a gain that is not 1 shows in the output
        normed.transformer.h[0].attn.k_norm.weight.mul_(1.5)
    assert not torch.allclose(normed(idx, idx)[0], outputs[0][1], rtol=1e-3, atol=1e-3)
    with_cache = normed.generate(idx[:, :9], 30, temperature=0)
    assert torch.equal(with_cache, normed.generate(idx[:, :9], 30, temperature=0, use_cache=False))


def test_relu2_activation_is_max_0_x_squared_and_unknown_ones_are_refused():
    gelu, relu2 = tiny().eval(), tiny(activation="relu2").eval()
    relu2.load_state_dict(gelu.state_dict())  # the same weights: only the activation differs
    mlp, x = relu2.transformer.h[0].mlp, torch.randn(2, 5, 36)
    torch.testing.assert_close(mlp(x), mlp.c_proj(torch.clamp(mlp.c_fc(x), min=0) ** 2))
    idx = torch.randint(0, 101, (2, 11))
    assert not torch.allclose(relu2(idx)[0], gelu(idx)[0])
    with pytest.raises(ValueError, match="activation='swish'"):
        GPTConfig(activation="swish")


def test_smear_must_be_0_1_or_2():
    with pytest.raises(ValueError, match="smear=3"):
        GPTConfig(smear=3)


def test_generate_stops_and_streams():
    model = tiny().eval()
    idx = torch.randint(0, 101, (1, 5))
    first = model.generate(idx, 1, temperature=0)[0, -1].item()
    seen = []
    out = model.generate(idx, 20, temperature=0, stop_tokens=(first,), callback=lambda t: seen.append(int(t[0])))
    assert out.shape[1] == 6 and seen == [first]


def test_generate_stops_at_block_size():
    model = tiny().eval()
    out = model.generate(torch.zeros(1, 40, dtype=torch.long), 100, temperature=0)
    assert out.shape[1] == model.config.block_size


def test_sampling_filters():
    torch.manual_seed(0)
    from minimm.sampling import sample_next
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]])
    picks = {int(sample_next(logits, 1.0, top_k=2, top_p=None)) for _ in range(200)}
    assert picks == {1, 2}
    picks = {int(sample_next(logits, 1.0, top_k=None, top_p=0.3)) for _ in range(200)}
    assert picks == {1}


def test_param_count_and_flops():
    model = tiny()
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - 101 * 36
    assert model.flops_per_token(48) > 6 * model.num_params()
