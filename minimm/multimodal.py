"""The multimodal model: image and audio encoders whose outputs are spliced into the GPT's input sequence.

Follows LLaVA (Liu et al. 2023, "Visual Instruction Tuning", https://arxiv.org/abs/2304.08485, and its
two-layer MLP projector from "Improved Baselines with Visual Instruction Tuning",
https://arxiv.org/abs/2310.03744), with Idefics3's pixel shuffle (Laurençon et al. 2024, "Building and
better understanding vision-language models", https://arxiv.org/abs/2408.12637), as nanoVLM uses it.

What this file teaches:
- The language model never sees pixels or mel frames. An encoder turns each image (ViT) or clip (audio
  encoder) into a sequence of vectors, a small MLP, the projector, maps them into the GPT's embedding
  space, and they take the places of placeholder tokens: rendering wrote one `<|image|>` per image
  embedding and one `<|audio|>` per audio frame, so the splice is a one-to-one, in-order fill.
- The splice is a boolean-mask scatter (`index_put`): differentiable with respect to what is written,
  so the loss trains the projector and the encoders through it; no loop over positions.
- Image tokens also get a learned place of their own in the GPT's space (why: Projector's docstring).
- A LayerNorm ends each projector and sets the scale at which media tokens enter the GPT: larger than the
  token embeddings, which a pre-norm GPT trained from scratch learned faster from here (Projector's docstring).
- Placeholders are never in the loss: a target that names a placeholder is set to -100. Predicting the
  text right after an image from the last image position stays in the loss: that is a caption's first word.
- Freezing is per part (`set_trainable`). The usual recipe trains the projector and adapts the LM:
  encoders frozen, projector trained fully, the GPT fine-tuned (fully, or through LoRA adapters).

Shape letters: B batch, T tokens, C channels of the GPT (n_embd), V vocabulary, N images or clips,
H W image height and width, P patches per image, gh gw patch grid, s pixel-shuffle factor, Ce encoder
channels, n_mels mel bands, F mel frames, Ta audio encoder frames (F / 2 rounded up), M media tokens.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn

from minimm.audio import AudioEncoder, AudioEncoderConfig
from minimm.data import audio_tokens
from minimm.gpt import GPT, GPTConfig
from minimm.lora import LoRALinear, mark_trainable
from minimm.vit import ViT, ViTConfig, interpolate_pos_emb, sincos_2d

IMAGE_POS_INIT_STD = 0.2  # the image tokens' own positions at init (Projector): ~3x the content's std
MEDIA_NORM_GAIN = 3.0  # std of each projected media token's channels at init (Projector's out_norm)


def pixel_shuffle(x: torch.Tensor, s: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Stack each s x s neighbourhood of patches into one token: (N, P, Ce) -> (N, P / s^2, s^2 * Ce).

    grid: (gh, gw) of the patches, row-major in P; None means a square grid. A merged token holds its
    patches in (row offset, column offset) order, channels last.
    """
    N, P, Ce = x.shape
    gh, gw = grid if grid is not None else (math.isqrt(P), math.isqrt(P))
    if gh * gw != P or gh % s or gw % s:
        raise ValueError(f"pixel shuffle {s}: a {gh}x{gw} grid of {P} patches does not split into "
                         f"{s}x{s} blocks")
    x = x.reshape(N, gh // s, s, gw // s, s, Ce)  # (N, gh/s, s, gw/s, s, Ce)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (N, gh/s, gw/s, s, s, Ce)
    return x.reshape(N, (gh // s) * (gw // s), s * s * Ce)  # (N, P/s^2, s^2 Ce)


def stack_frames(x: torch.Tensor, k: int) -> torch.Tensor:
    """Merge each run of k consecutive frames into one token, the 1-D pixel shuffle that audio LLMs use
    (Ultravox, Qwen2-Audio pool time the same way): (N, Ta, Ce) -> (N, ceil(Ta / k), k * Ce), the tail
    zero-padded. A token then holds k * 20 ms of sound in its channels, and the language model reads k
    times fewer audio positions, so a clip costs it k times less and its attention has fewer places to
    search when it looks for the next key or note."""
    N, Ta, Ce = x.shape
    pad = (-Ta) % k
    if pad:
        x = torch.cat([x, x.new_zeros(N, pad, Ce)], dim=1)  # (N, Ta + pad, Ce)
    return x.reshape(N, (Ta + pad) // k, k * Ce)  # (N, ceil(Ta / k), k Ce)


class Projector(nn.Module):
    """Encoder states -> GPT embeddings: Linear, GELU, Linear, after an optional pixel shuffle.

    Pixel shuffle (space-to-depth): a 48x48 image in 8x8 patches gives a 6x6 grid, P = 36 tokens of Ce
    channels. With s = 2 each 2x2 block of neighbouring patches becomes one token of 4 Ce channels:
    (N, 36, Ce) -> (N, 6, 6, Ce) -> (N, 3, 3, 2*2*Ce) -> (N, 9, 4 Ce), and the MLP maps 4 Ce -> C.
    Nothing is thrown away (the channels hold all four patches), but the language model reads s^2 = 4
    times fewer image tokens, so its sequences are shorter and its attention cheaper. Neighbours are
    merged because they are the patches most likely to belong to one object.
    in_dim: the encoder's channels Ce (before the shuffle); out_dim: the GPT's n_embd C.
    frame_stack: for audio, the same idea along time (stack_frames): (N, Ta, Ce) -> (N, Ta / k, k Ce).
    token_grid: (rows, columns) of the image tokens after the shuffle; given, each token also gets a
    learned position of its own in the GPT's space (pos_emb, below).

    Why image tokens need positions of their own in the GPT's space: the GPT's rotary positions make
    attention depend on how far apart two tokens are, but what an attended token passes on (its value)
    holds only what the token itself carries. The ViT adds its positions at its input; after its blocks,
    the shuffle and this MLP it is mixed into the content, and the GPT answered "Where is the red shape?"
    barely above chance: the red token has to say where it sits. A learned (rows, columns, C) table added
    to the projected tokens puts it back. It starts as 2-D sine-cosines (vit.sincos_2d) at
    IMAGE_POS_INIT_STD, above the projected content's std at init (~0.07), and is interpolated like the
    ViT's table for other image sizes.
    Measured (image-only, 300 steps, README): where 0.17 -> 0.49, count 0.87 -> 1.00, val loss 0.61 -> 0.52;
    in the 720-step default run, with fewer pictures per step, image val loss 0.69 -> 0.67 only.
    out_norm: a LayerNorm ends the projector (after the position table), its gain starting at
    MEDIA_NORM_GAIN, so media tokens enter the GPT at a scale set here rather than wherever the MLP drifts.

    Why a set scale, and why large: the GPT is pre-norm, so a token's residual stream starts as its input
    vector and every block adds to it; an input much larger than the blocks' updates stays what later
    blocks read at that position. Li et al. 2025 ("The Unseen Bias: How Norm Discrepancy in Pre-Norm MLLMs
    Leads to Visual Information Loss", https://arxiv.org/abs/2512.08374) put a LayerNorm after a pretrained
    LLaVA's projector to pull its high-norm image tokens down to the text's scale. Training from scratch for
    minutes, we measured the other direction: media tokens ~50x larger than the token embeddings learn best.
    Audio only, 200 steps (README): audio val loss 0.93 without the norm; with it, at gain 0.02 (the text's
    scale) 1.18, 1.0: 0.79, 3.0: 0.65, 10: 0.62; after 600 steps dtmf / notes 0.78 / 0.92 without it, 0.91 /
    0.95 with it. In the 720-step mixed run (audio drawn 1.3x): image val loss 0.67 -> 0.56 (color 0.25 ->
    0.69), audio 1.18 -> 1.01, and a linear probe names the sounding key from 51% of the projected tone
    tokens instead of 10%. Image only, 300 steps: no change (val loss 0.52 -> 0.53). With audio drawn 4x
    (config/mixed.py) the gain is small: val loss image 0.72 -> 0.69, audio 0.085 -> 0.073.
    """

    def __init__(self, in_dim: int, out_dim: int, pixel_shuffle: int = 1, frame_stack: int = 1,
                 token_grid: tuple[int, int] | None = None, out_norm: bool = False):
        super().__init__()
        if pixel_shuffle < 1 or frame_stack < 1:
            raise ValueError(f"pixel_shuffle={pixel_shuffle}, frame_stack={frame_stack}: must be at least 1")
        self.pixel_shuffle, self.frame_stack = pixel_shuffle, frame_stack
        merged = in_dim * pixel_shuffle ** 2 * frame_stack
        self.mlp = nn.Sequential(nn.Linear(merged, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        # the GPT's init, N(0, 0.02): projected media then start at the scale of the token embeddings
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.norm = None
        if out_norm:
            self.norm = nn.LayerNorm(out_dim)
            nn.init.constant_(self.norm.weight, MEDIA_NORM_GAIN)
        self.pos_emb = None  # (rows, columns, C) when token_grid is given
        if token_grid is not None:
            table = sincos_2d(*token_grid, out_dim)  # (rows, columns, C)
            self.pos_emb = nn.Parameter(table * (IMAGE_POS_INIT_STD / table.std()))

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """x: (N, P, Ce) -> (N, P / s^2, C), or (N, Ta, Ce) -> (N, Ta / k, C) with frame_stack k.
        grid: (gh, gw) when the patches are not a square grid."""
        if self.pixel_shuffle > 1:
            x = pixel_shuffle(x, self.pixel_shuffle, grid)  # (N, P/s^2, s^2 Ce)
        if self.frame_stack > 1:
            x = stack_frames(x, self.frame_stack)  # (N, Ta/k, k Ce)
        x = self.mlp(x)  # (N, M, C)
        if self.pos_emb is not None:  # image tokens: add each one's place in the (rows, columns) grid
            s = self.pixel_shuffle
            rows, columns = (grid[0] // s, grid[1] // s) if grid is not None else (math.isqrt(x.shape[1]),) * 2
            x = x + interpolate_pos_emb(self.pos_emb, rows, columns)  # (N, M, C) + (M, C)
        if self.norm is not None:
            x = self.norm(x)  # (N, M, C)
        return x


def _full_config(cls: type, values: dict, section: str) -> dict:
    """values completed with cls's defaults, so a checkpoint keeps every field; unknown keys are errors."""
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"{section}: unknown keys {unknown} for {cls.__name__}")
    return asdict(cls(**values))


@dataclass(kw_only=True)
class MultimodalConfig:
    """Everything needed to rebuild a MultimodalGPT; plain dicts and numbers, so it goes into JSON and into
    a checkpoint read with torch.load(weights_only=True)."""
    gpt: dict  # GPTConfig fields
    vision: dict | None = None  # ViTConfig fields; None: no image input
    audio: dict | None = None  # AudioEncoderConfig fields; None: no audio input
    pixel_shuffle: int = 1  # image tokens per image = ViT patches / pixel_shuffle^2
    audio_stack: int = 1  # audio tokens per clip = audio encoder frames / audio_stack, rounded up
    image_pos_emb: bool = False  # a learned position per image token in the GPT's space (Projector)
    projector_norm: bool = False  # a LayerNorm ends each projector, setting the media tokens' scale (Projector)
    image_token_id: int  # the tokenizer's <|image|>
    audio_token_id: int  # the tokenizer's <|audio|>

    def __post_init__(self) -> None:
        self.gpt = _full_config(GPTConfig, self.gpt, "gpt")
        if self.vision is not None:
            self.vision = _full_config(ViTConfig, self.vision, "vision")
            grid = self.vision["image_size"] // self.vision["patch_size"]
            if self.pixel_shuffle < 1 or grid % self.pixel_shuffle:
                raise ValueError(f"pixel_shuffle={self.pixel_shuffle} must be at least 1 and divide the "
                                 f"ViT's {grid}x{grid} patch grid")
        if self.audio_stack < 1:
            raise ValueError(f"audio_stack={self.audio_stack} must be at least 1")
        if self.audio is not None:
            self.audio = _full_config(AudioEncoderConfig, self.audio, "audio")
        vocab_size = self.gpt["vocab_size"]
        for name in ("image_token_id", "audio_token_id"):
            token = getattr(self, name)
            if not 0 <= token < vocab_size:
                raise ValueError(f"{name}={token} is outside the vocabulary (0..{vocab_size - 1})")
        if self.image_token_id == self.audio_token_id:
            raise ValueError(f"image_token_id and audio_token_id are both {self.image_token_id}")


class MultimodalGPT(nn.Module):
    """A GPT whose <|image|> and <|audio|> placeholder positions read projected encoder outputs."""

    def __init__(self, config: MultimodalConfig):
        super().__init__()
        self.config = config
        self.gpt = GPT(GPTConfig(**config.gpt))
        n_embd = self.gpt.config.n_embd
        if config.vision is not None:
            self.vision = ViT(ViTConfig(**config.vision))
            tokens_per_side = self.vision.config.image_size // self.vision.config.patch_size // config.pixel_shuffle
            self.image_projector = Projector(self.vision.config.n_embd, n_embd, config.pixel_shuffle,
                                             token_grid=(tokens_per_side,) * 2 if config.image_pos_emb else None,
                                             out_norm=config.projector_norm)
        if config.audio is not None:
            self.audio = AudioEncoder(AudioEncoderConfig(**config.audio))
            self.audio_projector = Projector(self.audio.config.n_embd, n_embd, frame_stack=config.audio_stack,
                                             out_norm=config.projector_norm)

    @classmethod
    def from_args(cls, args: dict) -> MultimodalGPT:
        """Rebuild from model_args() (e.g. a checkpoint's "model_args")."""
        return cls(MultimodalConfig(**args))

    def model_args(self) -> dict:
        return asdict(self.config)

    @property
    def image_tokens(self) -> int:
        """Placeholders per image: the ViT's patches / pixel_shuffle^2 (0 without a vision encoder)."""
        if not hasattr(self, "vision"):
            return 0
        return self.vision.config.n_patches // self.config.pixel_shuffle ** 2

    def audio_tokens(self, mel_lengths: list[int] | torch.Tensor) -> list[int]:
        """Placeholders for each clip: its mel frame count after the encoder's stride-2 convolution, then
        divided by the projector's audio_stack (rounded up)."""
        if len(mel_lengths) and not hasattr(self, "audio"):
            raise ValueError("this model has no audio encoder")
        return audio_tokens(torch.as_tensor(mel_lengths, dtype=torch.long), self.config.audio_stack).tolist()

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters of the GPT (as GPT.num_params counts them) plus those of the encoders and projectors."""
        media = sum(p.numel() for name, p in self.named_parameters() if not name.startswith("gpt."))
        return self.gpt.num_params(non_embedding) + media

    def _splice_images(self, x: torch.Tensor, idx: torch.Tensor,
                       images: torch.Tensor | None) -> torch.Tensor:
        """Write each image's projected embeddings at its <|image|> positions of x: (B, T, C)."""
        slots = idx == self.config.image_token_id  # (B, T)
        n_slots, n_images = int(slots.sum()), 0 if images is None else images.shape[0]
        if n_images and not hasattr(self, "vision"):
            raise ValueError(f"{n_images} images were given but this model has no vision encoder")
        if n_slots != n_images * self.image_tokens:
            raise ValueError(f"batch has {n_slots} <|image|> placeholders but {n_images} images x "
                             f"{self.image_tokens} tokens = {n_images * self.image_tokens}")
        if not n_images:
            return x
        ps = self.vision.config.patch_size
        grid = (images.shape[2] // ps, images.shape[3] // ps)
        media = self.image_projector(self.vision(images), grid)  # (N, P, Ce) -> (N, M, C)
        media = media.reshape(-1, media.shape[-1])  # (N * M, C), image after image
        return x.index_put((slots,), media.to(x.dtype))  # (B, T, C)

    def _splice_audio(self, x: torch.Tensor, idx: torch.Tensor, audio: torch.Tensor | None,
                      audio_lengths: torch.Tensor | None) -> torch.Tensor:
        """Write each clip's projected frames (padding dropped) at its <|audio|> slots of x: (B, T, C)."""
        slots = idx == self.config.audio_token_id  # (B, T)
        n_slots, n_clips = int(slots.sum()), 0 if audio is None else audio.shape[0]
        if n_clips and not hasattr(self, "audio"):
            raise ValueError(f"{n_clips} audio clips were given but this model has no audio encoder")
        if audio_lengths is None and n_clips:
            audio_lengths = torch.full((n_clips,), audio.shape[2], device=audio.device)
        clip_tokens = self.audio_tokens(audio_lengths) if n_clips else []
        if n_slots != sum(clip_tokens):
            raise ValueError(f"batch has {n_slots} <|audio|> placeholders but {n_clips} audio clips give "
                             f"{' + '.join(map(str, clip_tokens)) or '0'} = {sum(clip_tokens)} tokens")
        if not n_clips:
            return x
        media = self.audio_projector(self.audio(audio, audio_lengths))  # (N, Ta, Ce) -> (N, M, C)
        out_lengths = torch.tensor(clip_tokens, device=x.device)  # (N,) real tokens of each clip
        real = torch.arange(media.shape[1], device=x.device)[None, :] < out_lengths[:, None]  # (N, M)
        return x.index_put((slots,), media[real].to(x.dtype))  # (sum of M per clip, C) into (B, T, C)

    def embed(self, idx: torch.Tensor, images: torch.Tensor | None = None,
              audio: torch.Tensor | None = None, audio_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with media spliced in: idx (B, T) -> (B, T, C).

        images: (N_img, 3, H, W) normalised pixels; audio: (N_clip, n_mels, F) log-mel, padded to the
        longest clip; audio_lengths: (N_clip,) real mel frames per clip (None: no clip is padded).
        The <|image|> positions of idx, read row by row, take image 0's embeddings, then image 1's, ...;
        the <|audio|> positions likewise take each clip's own output frames. ValueError if counts differ.
        """
        x = self.gpt.transformer.wte(idx)  # (B, T, C)
        x = self._splice_images(x, idx, images)  # (B, T, C)
        return self._splice_audio(x, idx, audio, audio_lengths)  # (B, T, C)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                images: torch.Tensor | None = None, audio: torch.Tensor | None = None,
                audio_lengths: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, reduction: str = "mean"):
        """As GPT.forward, with media: returns (logits (B, T, V), loss), or (B, 1, V) logits and None
        without targets. targets: (B, T); any target that is a placeholder id becomes -100."""
        x = self.embed(idx, images, audio, audio_lengths)  # (B, T, C)
        if targets is not None:
            placeholder = (targets == self.config.image_token_id) | (targets == self.config.audio_token_id)
            targets = targets.masked_fill(placeholder, -100)  # (B, T)
        return self.gpt(inputs_embeds=x, targets=targets, segment_ids=segment_ids, reduction=reduction)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, images: torch.Tensor | None = None,
                 audio: torch.Tensor | None = None, audio_lengths: torch.Tensor | None = None,
                 **kw) -> torch.Tensor:
        """Continue idx: (B, T) with the media spliced into the prompt; returns (B, T + new).
        Other keywords (temperature, top_k, top_p, stop_tokens, callback, use_cache) go to GPT.generate."""
        embeds = self.embed(idx, images, audio, audio_lengths)  # (B, T, C)
        return self.gpt.generate(idx, max_new_tokens, inputs_embeds=embeds, **kw)


def _set_part(part: nn.Module, trainable: bool) -> None:
    """A part with LoRA adapters trains through them only; one without trains fully."""
    adapted = any(isinstance(m, LoRALinear) for m in part.modules())
    for name, p in part.named_parameters():
        p.requires_grad_(trainable and (not adapted or name.endswith((".lora_A", ".lora_B"))))


def set_trainable(model: MultimodalGPT, *, freeze_vision: bool = False, freeze_audio: bool = False,
                  freeze_llm: bool = False, freeze_projector: bool = False) -> dict[str, int]:
    """Set requires_grad per part: freeze_vision the ViT, freeze_audio the audio encoder, freeze_llm the
    GPT, freeze_projector both projectors. A part not frozen trains fully, or, if apply_lora has wrapped
    some of its Linears, through its adapters only (its base weights stay frozen).

    The usual recipe trains the projector and adapts the LM: freeze_vision=True, freeze_audio=True,
    freeze_llm=False (after apply_lora for a LoRA fine-tune), freeze_projector=False.
    With LoRA the projectors are recorded in model.lora_config (mark_trainable) when they train, so
    save_lora keeps them. Returns trainable parameter counts per part (a tied weight counted once).
    """
    projectors = [getattr(model, "image_projector", None), getattr(model, "audio_projector", None)]
    parts = {"vision": ([getattr(model, "vision", None)], freeze_vision),
             "audio": ([getattr(model, "audio", None)], freeze_audio),
             "llm": ([model.gpt], freeze_llm),
             "projector": (projectors, freeze_projector)}
    counts = {}
    for key, (modules, frozen) in parts.items():
        modules = [m for m in modules if m is not None]
        for m in modules:
            _set_part(m, not frozen)
        counts[key] = sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)
    lora_config = getattr(model, "lora_config", None)
    if lora_config is not None and counts["projector"]:
        mark_trainable(model, "projector")
    elif lora_config is not None:
        lora_config["trainable"] = [p for p in lora_config["trainable"] if p != "projector"]
    return counts
