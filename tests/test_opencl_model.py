"""The OpenCL GPT against minimm.gpt.GPT: logits, losses, greedy generation, training, checkpoints.

Tolerances: a forward pass is a chain of float32 ops whose sums run in another order than PyTorch's
(~1e-7 relative each); through a few small layers that stays below ~1e-5 on logits of size ~1, so
atol = 1e-4 catches any wrong op (a mis-indexed head or a missing bias is off by ~1e-2). Training
compounds those differences through AdamW; the spec's bound is 1e-3 relative on the loss, and 10 steps
here agree to ~1e-6. Weights after an update are compared to 2% of the learning rate: Adam divides the
gradient by its own magnitude, so an entry whose gradient is ~1e-8 (as small as Adam's eps: rounding
noise decides it) moves by a different fraction of lr on each side; the gradients themselves and the
loss trajectories are compared tightly. Runs on PoCL's CPU device; skips without OpenCL.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

pytest.importorskip("pyopencl", reason="pyopencl is not installed: pip install pyopencl pocl-binary-distribution")
from minimm.gpt import GPT, GPTConfig  # noqa: E402
from minimm.opencl import OpenCLGPT, OpenCLTrainer, load_gpt  # noqa: E402
from minimm.opencl.model import KVCache  # noqa: E402
from minimm.opencl.runtime import is_available  # noqa: E402
from minimm.training import configure_optimizer  # noqa: E402

if not is_available():
    pytest.skip("no OpenCL platform: pip install pyopencl pocl-binary-distribution", allow_module_level=True)

ATOL = 1e-4


def small_gpt(seed: int = 0, **overrides) -> GPT:
    """A random GPT with odd sizes; biases and norm gains perturbed so that a dropped one shows."""
    torch.manual_seed(seed)
    args = dict(vocab_size=97, block_size=40, n_layer=2, n_head=3, n_embd=36) | overrides
    model = GPT(GPTConfig(**args)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def batch(seed: int, B: int = 3, T: int = 17, V: int = 97, learnable: bool = False) -> tuple[torch.Tensor, ...]:
    """Random token ids and targets; learnable targets are a fixed function of the input token."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
    if learnable:
        y = (3 * x + 1) % V
    y[0, :4] = -100  # a prompt that is not in the loss
    return x, y


@pytest.mark.parametrize("pos_emb,bias,activation", [("rope", True, "gelu"), ("learned", True, "gelu"),
                                                     ("rope", False, "gelu"), ("rope", True, "relu2")])
def test_logits_and_loss_match_torch(pos_emb, bias, activation):
    model = small_gpt(pos_emb=pos_emb, bias=bias, activation=activation)
    cl = OpenCLGPT.from_torch(model)
    x, y = batch(1)
    with torch.no_grad():
        logits, loss = model(x, y)
        last_logits, _ = model(x)
        token_loss = model(x, y, reduction="none")[1]
    cl_logits, cl_loss = cl(x, y)
    np.testing.assert_allclose(cl_logits.numpy(), logits.numpy(), atol=ATOL)
    assert abs(cl_loss.item() - loss.item()) < 1e-5
    assert cl(x)[0].shape == (3, 1, 97)
    np.testing.assert_allclose(cl(x)[0].numpy(), last_logits.numpy(), atol=ATOL)
    np.testing.assert_allclose(cl(x, y, reduction="none")[1].numpy(), token_loss.numpy(), atol=1e-5)


def test_segment_ids_keep_packed_examples_apart():
    model = small_gpt()
    cl = OpenCLGPT.from_torch(model)
    x, y = batch(2, B=2, T=12)
    segments = torch.tensor([[0] * 5 + [1] * 7, [0] * 9 + [1] * 3])
    with torch.no_grad():
        logits, loss = model(x, y, segment_ids=segments)
    cl_logits, cl_loss = cl(x, y, segment_ids=segments)
    np.testing.assert_allclose(cl_logits.numpy(), logits.numpy(), atol=ATOL)
    assert abs(cl_loss.item() - loss.item()) < 1e-5


def assert_trains_like_torch(model: GPT, cl: OpenCLGPT, x, y, segments) -> None:
    """The OpenCL copy's logits and every parameter's gradient equal the PyTorch model's on one packed batch."""
    logits, loss = model(x, y, segment_ids=segments)
    loss.backward()
    cl_logits, cl_loss = cl(x, y, segment_ids=segments)
    np.testing.assert_allclose(cl_logits.numpy(), logits.detach().numpy(), atol=ATOL)
    trainer = OpenCLTrainer(cl, learning_rate=1e-2, betas=(0.9, 0.95), weight_decay=0.1, grad_clip=1.0)
    trainer.backward(x, y, segment_ids=segments)
    for name, p in model.named_parameters():
        np.testing.assert_allclose(cl.params[name].grad.numpy(), p.grad.numpy(), atol=1e-5, rtol=1e-4,
                                   err_msg=name)


@pytest.mark.parametrize("pos_emb,smear", [("rope", 1), ("learned", 1), ("rope", 2)])
def test_smear_matches_torch_packed_cached_and_in_gradients(pos_emb, smear):
    model = small_gpt(seed=7, smear=smear, pos_emb=pos_emb).train()  # smear weight ~0.05 after the noise
    cl = OpenCLGPT.from_torch(model)
    x, y = batch(8, B=2, T=13)
    segments = torch.tensor([[0] * 4 + [1] * 9, [0] * 10 + [1] * 3])  # the first example of each row ends early
    assert_trains_like_torch(model, cl, x, y, segments)  # the shift's backward included (smear and wte grads)
    # generation: the KV cache hands the last input to the next step, as GPT's does
    prompt = batch(9, B=2, T=5)[0]
    expected = model.eval().generate(prompt, max_new_tokens=25, temperature=0)
    assert torch.equal(cl.generate(prompt, max_new_tokens=25, temperature=0), expected)
    cache = KVCache(cl.config, 2, cl.device)
    cl(expected[:, :9], kv_cache=cache)
    for t in (9, 10):  # one position at a time: its previous inputs from the cache
        step = cl(expected[:, t:t + 1], kv_cache=cache)[0]  # (2, 1, V)
        with torch.no_grad():
            np.testing.assert_allclose(step.numpy(), model(expected[:, :t + 1])[0].numpy(), atol=ATOL)


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
def test_qk_norm_matches_torch_packed_cached_and_in_gradients(pos_emb):
    # the q / k gains perturbed off 1; the MLP with ReLU squared (GPTConfig.activation) on the same path
    model = small_gpt(seed=11, qk_norm=True, pos_emb=pos_emb, activation="relu2").train()
    cl = OpenCLGPT.from_torch(model)
    x, y = batch(12, B=2, T=15)
    segments = torch.tensor([[0] * 6 + [1] * 9, [0] * 15])
    assert_trains_like_torch(model, cl, x, y, segments)  # the norms' gains and everything under them
    prompt = batch(13, B=2, T=5)[0]  # generation: normalised keys go into the cache
    expected = model.eval().generate(prompt, max_new_tokens=25, temperature=0)
    assert torch.equal(cl.generate(prompt, max_new_tokens=25, temperature=0), expected)
    cache = KVCache(cl.config, 2, cl.device)
    cl(expected[:, :9], kv_cache=cache)
    step = cl(expected[:, 9:11], kv_cache=cache)[0]  # two positions at once, at offset 9
    with torch.no_grad():
        np.testing.assert_allclose(step.numpy(), model(expected[:, :11])[0].numpy(), atol=ATOL)


def test_checkpoint_with_compile_prefixes_loads():
    model = small_gpt(pos_emb="learned")
    buffer = io.BytesIO()
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()},
                "model_args": model.model_args()}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    cl = load_gpt(ckpt["model"], ckpt["model_args"])
    x, _ = batch(3)
    with torch.no_grad():
        np.testing.assert_allclose(cl(x)[0].numpy(), model(x)[0].numpy(), atol=ATOL)
    with pytest.raises(KeyError, match="missing"):
        load_gpt({k: v for k, v in model.state_dict().items() if "ln_f" not in k}, model.model_args())


def test_greedy_generation_matches_torch_token_for_token():
    model = small_gpt(seed=3)
    cl = OpenCLGPT.from_torch(model)
    prompt = batch(4, B=2, T=5)[0]
    expected = model.generate(prompt, max_new_tokens=30, temperature=0)
    assert torch.equal(cl.generate(prompt, max_new_tokens=30, temperature=0), expected)
    # the logits behind each step agree too, with and without the KV cache
    with torch.no_grad():
        full = model(expected[:, :-1], expected[:, 1:])[0]
    np.testing.assert_allclose(cl(expected[:, :-1], expected[:, 1:])[0].numpy(), full.numpy(), atol=ATOL)
    assert torch.equal(cl.generate(prompt, 30, temperature=0, use_cache=False), expected)


def test_generation_stops_and_respects_the_context():
    model = small_gpt(seed=4, block_size=12)
    cl = OpenCLGPT.from_torch(model)
    prompt = batch(5, B=1, T=4)[0]
    first = int(cl.generate(prompt, 1, temperature=0)[0, -1])
    stopped = cl.generate(prompt, 8, temperature=0, stop_tokens=(first,))
    assert stopped.shape == (1, 5) and int(stopped[0, -1]) == first
    assert cl.generate(prompt, 50, temperature=0).shape == (1, 12)  # block_size ends it
    torch.manual_seed(0)
    sampled = cl.generate(prompt, 6, temperature=0.8, top_k=5)
    assert sampled.shape == (1, 10) and sampled.max() < 97


def torch_step(model, optimizer, x, y, lr, grad_clip=1.0) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def test_one_training_step_has_torchs_gradients_and_update():
    model = small_gpt(seed=5).train()
    cl = OpenCLGPT.from_torch(model)
    trainer = OpenCLTrainer(cl, learning_rate=1e-2, betas=(0.9, 0.95), weight_decay=0.1, grad_clip=0.5)
    x, y = batch(6)
    _, loss = model(x, y)
    loss.backward()
    token_loss = trainer.backward(x, y)
    assert abs(token_loss[y != -100].mean().item() - loss.item()) < 1e-5
    for name, p in model.named_parameters():
        np.testing.assert_allclose(cl.params[name].grad.numpy(), p.grad.numpy(), atol=1e-5, rtol=1e-4,
                                   err_msg=name)
    optimizer = configure_optimizer(model, 0.1, 1e-2, (0.9, 0.95), "cpu")
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    optimizer.step()
    assert abs(trainer.update(1e-2) - norm.item()) < 1e-4 * norm.item()
    for name, p in model.state_dict().items():
        np.testing.assert_allclose(cl.state_dict()[name].numpy(), p.numpy(), atol=0.02 * 1e-2, err_msg=name)


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
def test_ten_steps_of_adamw_track_torch(pos_emb):
    model = small_gpt(seed=6, pos_emb=pos_emb).train()
    cl = OpenCLGPT.from_torch(model)
    trainer = OpenCLTrainer(cl, 3e-3, (0.9, 0.95), weight_decay=0.1, grad_clip=1.0)
    optimizer = configure_optimizer(model, 0.1, 3e-3, (0.9, 0.95), "cpu")
    losses = []
    for step in range(10):
        x, y = batch(100 + step, learnable=True)
        lr = 3e-3 * (step + 1) / 10  # the learning rate changes every step, as train.py's schedule
        torch_loss = torch_step(model, optimizer, x, y, lr)
        cl_loss = trainer.step(x, y, lr)
        assert abs(cl_loss - torch_loss) <= 1e-3 * abs(torch_loss), f"step {step}"
        losses.append(cl_loss)
    with torch.no_grad():
        final = model(*batch(999, learnable=True))[1].item()
    assert abs(cl(*batch(999, learnable=True))[1].item() - final) <= 1e-4 * final
    assert final < losses[0] - 0.05  # it learned: the same function on both sides, not a frozen one


def test_token_weighted_accumulation_and_checkpoint_formats():
    model = small_gpt(seed=7).train()
    cl = OpenCLGPT.from_torch(model)
    trainer = OpenCLTrainer(cl, 1e-2, (0.9, 0.95), 0.1, grad_clip=1.0)
    optimizer = configure_optimizer(model, 0.1, 1e-2, (0.9, 0.95), "cpu")
    micro = [batch(10, B=2), batch(11, B=2)]
    n_supervised = sum(int((y != -100).sum()) for _, y in micro)
    for x, y in micro:  # minimm.training's accumulation: sum of token losses over the step's count
        (model(x, y, reduction="none")[1].sum() / n_supervised).backward()
        trainer.backward(x, y, loss_scale=1.0 / n_supervised)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    trainer.update(1e-2)
    fresh = GPT(model.config)
    trainer.copy_to(fresh)  # load_state_dict, strict: every key, tied head included
    for name, p in model.state_dict().items():
        np.testing.assert_allclose(fresh.state_dict()[name].numpy(), p.numpy(), atol=0.02 * 1e-2, err_msg=name)
    # the optimizer state is torch's: resume the torch run from the OpenCL state and vice versa
    resumed = configure_optimizer(fresh, 0.1, 1e-2, (0.9, 0.95), "cpu")
    resumed.load_state_dict(trainer.optimizer_state_dict())
    other = OpenCLTrainer(OpenCLGPT.from_torch(model), 1e-2, (0.9, 0.95), 0.1, grad_clip=1.0)
    other.load_optimizer_state_dict(optimizer.state_dict())
    x, y = batch(12)
    torch_step(model, optimizer, x, y, 1e-2)
    torch_step(fresh, resumed, x, y, 1e-2)
    other.step(x, y, 1e-2)
    for name, p in model.state_dict().items():  # two updates: 2% of lr each
        np.testing.assert_allclose(fresh.state_dict()[name].numpy(), p.numpy(), atol=0.04 * 1e-2, err_msg=name)
        np.testing.assert_allclose(other.state_dict()[name].numpy(), p.numpy(), atol=0.04 * 1e-2, err_msg=name)


def test_multimodal_model_generates_with_an_opencl_decoder():
    """sample.py's integration: use_opencl_decoder keeps the ViT in PyTorch and decodes on OpenCL."""
    from minimm.multimodal import MultimodalGPT
    from minimm.opencl import use_opencl_decoder
    torch.manual_seed(8)
    model = MultimodalGPT.from_args(dict(
        gpt=dict(vocab_size=97, block_size=48, n_layer=2, n_head=3, n_embd=36),
        vision=dict(image_size=16, patch_size=8, n_layer=1, n_head=2, n_embd=20),
        image_token_id=95, audio_token_id=96)).eval()
    prompt = torch.tensor([[3, 95, 95, 95, 95, 7, 8]])  # an image's 4 placeholder tokens
    images = torch.randn(1, 3, 16, 16)
    expected = model.generate(prompt, 12, images=images, temperature=0)
    ckpt = {"model": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()},
            "model_args": model.model_args()}
    with torch.no_grad():
        x = torch.tensor([[1, 2, 3, 4, 5]])
        np.testing.assert_allclose(load_gpt(ckpt["model"], ckpt["model_args"])(x)[0].numpy(),
                                   model(x)[0].numpy(), atol=ATOL)
    use_opencl_decoder(model)
    assert torch.equal(model.generate(prompt, 12, images=images, temperature=0), expected)


def test_merged_lora_model_is_copied_with_its_effective_weights():
    from minimm.lora import apply_lora, merge_lora
    model = small_gpt(seed=9)
    apply_lora(model, "attn.c_attn", r=2, alpha=4.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a trained adapter: nonzero update
    x = batch(13)[0]
    with pytest.raises(ValueError, match="merge_lora"):
        OpenCLGPT.from_torch(model)
    merge_lora(model)
    with torch.no_grad():
        np.testing.assert_allclose(OpenCLGPT.from_torch(model)(x)[0].numpy(), model(x)[0].numpy(), atol=ATOL)


def test_vit_forward_and_gradients_match_torch():
    from minimm.opencl.tensor import Tensor
    from minimm.opencl.vit import OpenCLViT
    from minimm.vit import ViT, ViTConfig
    torch.manual_seed(10)
    vit = ViT(ViTConfig(image_size=24, patch_size=8, n_layer=2, n_head=2, n_embd=20))
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    images = torch.randn(2, 3, 24, 24)
    cl = OpenCLViT.from_torch(vit)
    out = vit(images)  # (B, P, C)
    np.testing.assert_allclose(cl(images).numpy(), out.detach().numpy(), atol=ATOL)
    upstream = torch.randn(out.shape)
    (out * upstream).sum().backward()
    for t in cl.params.values():
        t.requires_grad = True
    cl.forward_tensors(images).backward(Tensor.from_numpy(cl.device, upstream.numpy()))
    for name, p in vit.named_parameters():
        np.testing.assert_allclose(cl.params[name].grad.numpy().reshape(p.shape), p.grad.numpy(),
                                   atol=1e-4, rtol=1e-4, err_msg=name)
    bigger = torch.randn(1, 3, 32, 32)  # a 4x4 grid from the 3x3 one: interpolated positions
    with torch.no_grad():
        np.testing.assert_allclose(cl(bigger).numpy(), vit(bigger).numpy(), atol=ATOL)
    assert all(torch.equal(cl.state_dict()[name], t) for name, t in vit.state_dict().items())


@pytest.mark.parametrize("padded", [False, True])
def test_audio_encoder_forward_and_gradients_match_torch(padded):
    from minimm.audio import AudioEncoder, AudioEncoderConfig
    from minimm.opencl.audio import OpenCLAudioEncoder
    from minimm.opencl.tensor import Tensor
    torch.manual_seed(11)
    encoder = AudioEncoder(AudioEncoderConfig(n_mels=12, n_embd=24, n_layer=2, n_head=2, max_frames=40))
    mels, lengths = torch.randn(2, 12, 23), torch.tensor([23, 14]) if padded else None
    cl = OpenCLAudioEncoder.from_torch(encoder)
    out = encoder(mels, lengths)  # (B, T, C)
    np.testing.assert_allclose(cl(mels, lengths).numpy(), out.detach().numpy(), atol=ATOL)
    upstream = torch.randn(out.shape)
    (out * upstream).sum().backward()
    for t in cl.params.values():
        t.requires_grad = True
    cl.forward_tensors(mels, lengths).backward(Tensor.from_numpy(cl.device, upstream.numpy()))
    for name, p in encoder.named_parameters():
        np.testing.assert_allclose(cl.params[name].grad.numpy(), p.grad.numpy(), atol=1e-4, rtol=1e-4,
                                   err_msg=name)


def test_trainer_refuses_dropout():
    with pytest.raises(ValueError, match="dropout"):
        OpenCLTrainer(OpenCLGPT.from_torch(small_gpt(dropout=0.1)))
