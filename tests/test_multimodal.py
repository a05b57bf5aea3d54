"""MultimodalGPT: the splice, the loss mask, pixel shuffle, freezing, generation, checkpoints and LoRA."""
import json

import pytest
import torch

from minimm.audio import AudioEncoder
from minimm.lora import DEFAULT_TARGETS, LoRALinear, apply_lora, lora_state_dict
from minimm.data import audio_tokens
from minimm.multimodal import MultimodalConfig, MultimodalGPT, set_trainable
from minimm.projector import MEDIA_NORM_GAIN, Projector, pixel_shuffle, stack_frames

IMAGE, AUDIO = 50, 51  # placeholder ids inside the tiny vocabulary
ARGS = dict(
    gpt=dict(vocab_size=53, block_size=97, n_layer=2, n_head=2, n_embd=24),
    vision=dict(image_size=18, patch_size=3, n_layer=1, n_head=2, n_embd=12),  # 6x6 grid: 36 patches
    audio=dict(n_mels=10, n_embd=14, n_layer=1, n_head=2, max_frames=41),
    pixel_shuffle=2,  # 36 patches -> 9 image tokens
    image_pos_emb=True,  # ... each with a learned place of its own in the 3x3 grid
    projector_norm=True,  # projected tokens end in a LayerNorm that sets their scale
    image_token_id=IMAGE,
    audio_token_id=AUDIO,
)
M = 9  # image tokens per image


def make_model(seed: int = 0, **overrides) -> MultimodalGPT:
    torch.manual_seed(seed)
    return MultimodalGPT.from_args({**ARGS, **overrides}).eval()


def text(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(seed))


def image_batch() -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Three rows: two images in row 0, text only in row 1, one image in row 2.
    Returns idx (3, 31), images (3, 3, 18, 18) and the (row, first position) of each image's run."""
    starts = [(0, 2), (0, 16), (2, 5)]
    idx = torch.stack([text(31, seed) for seed in range(3)])
    for row, start in starts:
        idx[row, start:start + M] = IMAGE
    return idx, torch.randn(3, 3, 18, 18, generator=torch.Generator().manual_seed(7)), starts


def test_image_tokens_and_config_validation():
    model = make_model()
    assert model.image_tokens == M
    assert make_model(pixel_shuffle=1).image_tokens == 36
    assert make_model(vision=None).image_tokens == 0
    with pytest.raises(ValueError, match="pixel_shuffle=4"):
        MultimodalConfig(**{**ARGS, "pixel_shuffle": 4})  # 4 does not divide the 6x6 grid
    with pytest.raises(ValueError, match="unknown keys"):
        MultimodalConfig(**{**ARGS, "gpt": {**ARGS["gpt"], "n_embed": 24}})
    with pytest.raises(ValueError, match="image_token_id=53"):
        MultimodalConfig(**{**ARGS, "image_token_id": 53})


def test_pixel_shuffle_merges_neighbourhoods():
    x = torch.randn(2, 36, 5)  # a 6x6 grid of 5-channel patches
    y = pixel_shuffle(x, 2)
    assert y.shape == (2, 9, 20)
    # merged token (1, 2) of the 3x3 grid holds patches (2, 4), (2, 5), (3, 4), (3, 5) of the 6x6 grid
    expected = torch.cat([x[:, 2 * 6 + 4], x[:, 2 * 6 + 5], x[:, 3 * 6 + 4], x[:, 3 * 6 + 5]], dim=-1)
    torch.testing.assert_close(y[:, 1 * 3 + 2], expected, rtol=0, atol=0)
    assert pixel_shuffle(torch.randn(1, 24, 5), 2, grid=(4, 6)).shape == (1, 6, 20)
    with pytest.raises(ValueError, match="6x6 grid"):
        pixel_shuffle(x, 4)
    projector = Projector(5, 7, pixel_shuffle=3)
    assert projector.mlp[0].in_features == 45 and projector(x).shape == (2, 4, 7)


def test_image_tokens_carry_their_place_in_the_grid():
    projector = Projector(5, 7, pixel_shuffle=2, token_grid=(3, 3))
    assert projector.pos_emb.shape == (3, 3, 7)
    x = torch.randn(2, 36, 5)  # two 6x6 grids of patches
    plain = projector.mlp(pixel_shuffle(x, 2))  # (2, 9, 7) what the MLP alone makes of each token
    torch.testing.assert_close(projector(x), plain + projector.pos_emb.reshape(9, 7), rtol=0, atol=0)
    # one patch content everywhere: without positions all 9 tokens are equal, with them all differ
    same = torch.randn(1, 1, 5).expand(1, 36, 5)
    assert torch.unique(projector.mlp(pixel_shuffle(same, 2)).round(decimals=5), dim=1).shape[1] == 1
    assert torch.unique(projector(same).round(decimals=5), dim=1).shape[1] == 9
    # another image size: the table is interpolated to its token grid, (8, 6) patches -> (4, 3) tokens
    assert projector(torch.randn(2, 48, 5), grid=(8, 6)).shape == (2, 12, 7)
    # a checkpoint from before this option has no image_pos_emb in its model_args: no table
    old_args = {k: v for k, v in ARGS.items() if k != "image_pos_emb"}
    assert MultimodalGPT.from_args(old_args).image_projector.pos_emb is None
    assert "image_projector.pos_emb" in make_model().state_dict()


def test_audio_tokens_carry_their_place_in_time():
    projector = Projector(5, 8, frame_stack=2, max_tokens=6)
    assert projector.pos_emb.shape == (6, 8)
    x = torch.randn(3, 9, 5)  # three clips of 9 encoder frames -> 5 tokens each (the last one padded)
    plain = projector.mlp(stack_frames(x, 2))  # (3, 5, 8)
    torch.testing.assert_close(projector(x), plain + projector.pos_emb[:5], rtol=0, atol=0)
    # one frame content throughout: without the table every token is the same, with it each differs
    same = torch.randn(1, 1, 5).expand(1, 12, 5)
    assert torch.unique(projector(same).round(decimals=5), dim=1).shape[1] == 6
    with pytest.raises(ValueError, match="7 audio tokens"):
        projector(torch.randn(1, 14, 5))
    with pytest.raises(ValueError, match="exclude each other"):
        Projector(5, 8, token_grid=(3, 3), max_tokens=6)
    # the model sizes the table for its encoder's longest input; a clip's tokens do not depend on the
    # padding that shares its batch, and old checkpoints (no audio_pos_emb in model_args) have no table
    model = make_model(audio_pos_emb=True)
    assert model.audio_projector.pos_emb.shape[0] == audio_tokens(ARGS["audio"]["max_frames"], 1)
    mels = torch.randn(2, 10, 30)
    alone = model.audio_projector(model.audio(mels[:1, :, :17], torch.tensor([17])))  # (1, 9, C)
    batched = model.audio_projector(model.audio(mels, torch.tensor([17, 30])))  # (2, 15, C)
    torch.testing.assert_close(batched[0, :9], alone[0], rtol=1e-5, atol=1e-5)
    assert make_model().audio_projector.pos_emb is None


def test_projector_norm_sets_the_media_tokens_scale():
    x = torch.randn(2, 36, 5) * 40.0  # encoder outputs far from the GPT's scale
    plain = Projector(5, 16, pixel_shuffle=2, token_grid=(3, 3))
    normed = Projector(5, 16, pixel_shuffle=2, token_grid=(3, 3), out_norm=True)
    normed.load_state_dict(plain.state_dict(), strict=False)  # the same MLP and table, plus the norm
    before, after = plain(x), normed(x)  # (2, 9, 16) each
    # the norm comes last, after the position table: each token is the plain one, centred and rescaled
    centred = before - before.mean(-1, keepdim=True)
    expected = centred / (centred.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * MEDIA_NORM_GAIN
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after.std(-1, unbiased=False), torch.full((2, 9), MEDIA_NORM_GAIN), rtol=1e-3, atol=0)
    # both projectors of the model have it; a checkpoint from before this option has neither
    model = make_model()
    assert model.image_projector.norm is not None and model.audio_projector.norm is not None
    old = MultimodalGPT.from_args({k: v for k, v in ARGS.items() if k != "projector_norm"})
    assert old.image_projector.norm is None and old.audio_projector.norm is None
    assert not any(".norm." in name for name in old.state_dict())


def test_splice_puts_each_image_at_its_placeholders():
    model = make_model()
    idx, images, starts = image_batch()
    x = model.embed(idx, images=images)
    projected = model.image_projector(model.vision(images))  # (3, M, C)
    for i, (row, start) in enumerate(starts):
        torch.testing.assert_close(x[row, start:start + M], projected[i], rtol=0, atol=0)
    text_positions = idx != IMAGE
    tokens = model.gpt.transformer.wte(idx)
    torch.testing.assert_close(x[text_positions], tokens[text_positions], rtol=0, atol=0)


def test_placeholders_are_never_in_the_loss():
    model = make_model()
    idx, images, _ = image_batch()
    targets = torch.cat([idx[:, 1:], text(3, 99)[:, None]], dim=1)  # every next token, placeholders too
    is_placeholder = targets == IMAGE
    _, loss = model(idx, targets, images=images)
    _, manual = model(idx, targets.masked_fill(is_placeholder, -100), images=images)
    torch.testing.assert_close(loss, manual, rtol=0, atol=0)
    _, token_loss = model(idx, targets, images=images, reduction="none")
    assert (token_loss[is_placeholder] == 0).all() and (token_loss[~is_placeholder] > 0).all()
    # the position after an image run (its target is text) stays in the loss: a caption's first word
    assert not is_placeholder[0, 2 + M - 1] and token_loss[0, 2 + M - 1] > 0


def test_audio_clips_of_different_lengths_splice_their_own_frames():
    model = make_model()
    lengths = torch.tensor([17, 10, 23])
    mels = torch.randn(3, 10, 23)
    for i, n in enumerate(lengths.tolist()):
        mels[i, :, n:] = 5.0  # padding noise that must not reach the language model
    out = model.audio_tokens(lengths)
    assert out == [9, 5, 12]
    idx = torch.stack([text(40, seed) for seed in range(2)])
    idx[0, 3:3 + 9] = AUDIO
    idx[0, 20:20 + 5] = AUDIO  # row 0 holds clips 0 and 1
    idx[1, 7:7 + 12] = AUDIO
    x = model.embed(idx, audio=mels, audio_lengths=lengths)
    for (row, start), i in zip([(0, 3), (0, 20), (1, 7)], range(3)):
        n = lengths[i].item()
        alone = model.audio_projector(model.audio(mels[i:i + 1, :, :n]))[0]  # the clip unpadded: (Ta, C)
        assert alone.shape[0] == out[i] == AudioEncoder.output_lengths(lengths[i]).item()
        # padded and unpadded batches round differently (~1e-7); the projector's norm scales that up
        # with the tokens, to channels of std MEDIA_NORM_GAIN: float32 agreement at that scale is ~1e-5
        torch.testing.assert_close(x[row, start:start + out[i]], alone, rtol=1e-5, atol=1e-5)
    spliced = model.embed(idx[:1, :30], audio=mels[:2, :, :17], audio_lengths=lengths[:2])
    torch.testing.assert_close(spliced[0, 3:12], x[0, 3:12], rtol=1e-5, atol=1e-5)  # less padding, same


def test_stack_frames_merges_neighbours_in_time_and_pads_the_tail():
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # (N, Ta, Ce)
    y = stack_frames(x, 2)  # (2, 3, 6): frames (0, 1), (2, 3), (4, zeros)
    assert y.shape == (2, 3, 6)
    torch.testing.assert_close(y[1, 0], torch.cat([x[1, 0], x[1, 1]]))
    torch.testing.assert_close(y[0, 2], torch.cat([x[0, 4], torch.zeros(3)]))
    assert stack_frames(x, 1).equal(x)


def test_audio_stack_splices_each_clip_at_its_fewer_placeholders():
    model = make_model(audio_stack=3)
    lengths = torch.tensor([17, 10, 23])  # encoder frames 9, 5, 12 -> tokens 3, 2, 4
    out = model.audio_tokens(lengths)
    assert out == [3, 2, 4] == [audio_tokens(n, 3) for n in lengths.tolist()]  # the data side agrees
    mels = torch.randn(3, 10, 23)
    mels[1, :, 10:] = 5.0  # padding that must not reach the language model
    idx = text(40, 0)[None].repeat(2, 1)
    idx[0, 3:6], idx[0, 20:22], idx[1, 7:11] = AUDIO, AUDIO, AUDIO
    x = model.embed(idx, audio=mels, audio_lengths=lengths)
    for (row, start), i in zip([(0, 3), (0, 20), (1, 7)], range(3)):
        n = lengths[i].item()
        alone = model.audio_projector(model.audio(mels[i:i + 1, :, :n]))[0]  # (tokens, C)
        assert alone.shape[0] == out[i]  # atol 1e-5: why in the test above
        torch.testing.assert_close(x[row, start:start + out[i]], alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="audio_stack"):
        make_model(audio_stack=0)


def test_count_mismatch_raises_a_clear_error():
    model = make_model()
    idx, images, _ = image_batch()
    message = r"batch has 27 <\|image\|> placeholders but 2 images x 9 tokens = 18"
    with pytest.raises(ValueError, match=message):
        model.embed(idx, images=images[:2])
    with pytest.raises(ValueError, match=r"27 <\|image\|> placeholders but 0 images"):
        model.embed(idx)
    message = r"batch has 4 <\|audio\|> placeholders but 2 audio clips give 9 \+ 5 = 14 tokens"
    with pytest.raises(ValueError, match=message):
        model.embed(torch.tensor([[1, AUDIO, AUDIO, AUDIO, AUDIO, 2]]), audio=torch.randn(2, 10, 17),
                    audio_lengths=torch.tensor([17, 10]))
    with pytest.raises(ValueError, match="no vision encoder"):
        make_model(vision=None).embed(torch.tensor([[1, 2]]), images=images)


PARTS = {"vision": ["vision"], "audio": ["audio"], "llm": ["gpt"],
         "projector": ["image_projector", "audio_projector"]}


@pytest.mark.parametrize("frozen", [(), ("vision",), ("audio",), ("llm",), ("projector",),
                                    ("vision", "audio"), ("vision", "audio", "llm", "projector")])
def test_each_freeze_flag_freezes_exactly_its_part(frozen):
    model = make_model()
    counts = set_trainable(model, **{f"freeze_{part}": part in frozen for part in PARTS})
    for part, modules in PARTS.items():
        for name in modules:
            flags = {p.requires_grad for p in getattr(model, name).parameters()}
            assert flags == {part not in frozen}, (part, name)
        total = sum(p.numel() for name in modules for p in getattr(model, name).parameters())
        assert counts[part] == (0 if part in frozen else total)


def test_gradients_reach_projectors_and_encoders_unless_frozen():
    model = make_model()
    idx, images, _ = image_batch()
    idx[1, 3:3 + 9] = AUDIO  # the text-only row now holds a 17-frame clip
    mels = torch.randn(1, 10, 17)
    set_trainable(model, freeze_vision=True)
    _, loss = model(idx, torch.roll(idx, -1, dims=1), images=images, audio=mels)
    loss.backward()
    assert all(p.grad is None for p in model.vision.parameters())
    for name in ("image_projector", "audio_projector", "audio", "gpt"):
        assert all(p.grad is not None for p in getattr(model, name).parameters()), name
    assert model.image_projector.mlp[0].weight.grad.abs().sum() > 0
    assert model.audio.conv1.weight.grad.abs().sum() > 0

    model.zero_grad(set_to_none=True)
    set_trainable(model)
    model(idx, torch.roll(idx, -1, dims=1), images=images, audio=mels)[1].backward()
    assert model.vision.patch_embed.weight.grad.abs().sum() > 0


def test_generate_with_image_matches_no_cache():
    model = make_model(seed=3)
    prompt = torch.cat([text(4, 1), torch.full((M,), IMAGE), text(5, 2), torch.full((5,), AUDIO)])[None]
    images, mels = torch.randn(1, 3, 18, 18), torch.randn(1, 10, 9)
    media = dict(images=images, audio=mels)
    cached = model.generate(prompt, 11, temperature=0.0, **media)
    plain = model.generate(prompt, 11, temperature=0.0, use_cache=False, **media)
    assert cached.shape == (1, prompt.shape[1] + 11)
    assert torch.equal(cached[:, :prompt.shape[1]], prompt)
    assert torch.equal(cached, plain)
    # the image matters: a different one changes the first greedy tokens' logits
    logits, _ = model(prompt, **media)
    other, _ = model(prompt, images=-images, audio=mels)
    assert not torch.allclose(logits, other)


def test_model_args_round_trip(tmp_path):
    model = make_model(seed=4)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_args": model.model_args()}, path)
    ckpt = torch.load(path, weights_only=True)
    json.dumps(ckpt["model_args"])
    rebuilt = MultimodalGPT.from_args(ckpt["model_args"]).eval()
    rebuilt.load_state_dict(ckpt["model"], strict=True)
    assert rebuilt.model_args() == model.model_args()
    idx, images, _ = image_batch()
    torch.testing.assert_close(rebuilt(idx, idx, images=images)[0], model(idx, idx, images=images)[0],
                               rtol=0, atol=0)


def test_lora_adapts_every_block_but_not_the_projectors():
    model = make_model()
    wrapped = apply_lora(model, DEFAULT_TARGETS, r=2, alpha=4.0)
    assert not any("projector" in n for n in wrapped)
    for name in ("gpt.transformer.h.0.attn.c_attn", "gpt.transformer.h.1.mlp.c_proj",
                 "vision.blocks.0.attn.qkv", "vision.blocks.0.mlp.fc",
                 "audio.blocks.0.attn.c_attn", "audio.blocks.0.mlp.c_fc"):
        assert name in wrapped
    assert not isinstance(model.image_projector.mlp[0], LoRALinear)
    # the usual recipe: encoders frozen, projector trained fully, the LM through its adapters only
    counts = set_trainable(model, freeze_vision=True, freeze_audio=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith((".lora_A", ".lora_B")) for n in trainable if n.startswith("gpt."))
    assert any(n.startswith("gpt.") for n in trainable)
    assert not any(n.startswith(("vision.", "audio.")) for n in trainable)
    assert {n for n, _ in model.image_projector.named_parameters(prefix="image_projector")} <= trainable
    assert counts["projector"] > 0 and counts["vision"] == counts["audio"] == 0
    saved = lora_state_dict(model)["tensors"]
    assert "image_projector.mlp.0.weight" in saved and "audio_projector.mlp.2.bias" in saved
    set_trainable(model, freeze_vision=True, freeze_audio=True, freeze_projector=True)
    assert "image_projector.mlp.0.weight" not in lora_state_dict(model)["tensors"]
