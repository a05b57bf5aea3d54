"""The multimodal model: image and audio encoders whose outputs are spliced into the GPT's input sequence.

Follows LLaVA (Liu et al. 2023, "Visual Instruction Tuning", https://arxiv.org/abs/2304.08485); the
projector, with its pixel shuffle, position table and norm, is minimm/projector.py.

What this file teaches:
- The language model never sees pixels or mel frames. An encoder turns each image (ViT) or clip (audio
  encoder) into a sequence of vectors, a small MLP, the projector, maps them into the GPT's embedding
  space, and they take the places of placeholder tokens: rendering wrote one `<|image|>` per image
  embedding and one `<|audio|>` per audio frame, so the splice is a one-to-one, in-order fill.
- The splice is a boolean-mask scatter (`index_put`): differentiable with respect to what is written,
  so the loss trains the projector and the encoders through it; no loop over positions.
- Placeholders are never in the loss: a target that names a placeholder is set to -100. Predicting the
  text right after an image from the last image position stays in the loss: that is a caption's first word.
- Freezing is per part (`set_trainable`). The usual recipe trains the projector and adapts the LM:
  encoders frozen, projector trained fully, the GPT fine-tuned (fully, or through LoRA adapters).

Shape letters: B batch, T tokens, C channels of the GPT (n_embd), V vocabulary, N images or clips,
H W image height and width, P patches per image, Ce encoder channels, n_mels mel bands, F mel frames,
Ta audio encoder frames (F / 2 rounded up), M media tokens.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn

from minimm.audio import AudioEncoder, AudioEncoderConfig
from minimm.data import audio_tokens
from minimm.gpt import GPT, GPTConfig
from minimm.lora import LoRALinear, mark_trainable
from minimm.projector import Projector
from minimm.vit import ViT, ViTConfig


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
    audio_pos_emb: bool = False  # a learned position per audio token in the GPT's space (Projector)
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


def model_args_from_config(cfg, vocab_size: int, image_token_id: int, audio_token_id: int, *,
                           images: bool = True, audio: bool = True) -> dict:
    """MultimodalConfig's fields from a TrainConfig: the model sizes of config/*.py and --key=value.
    images / audio: whether the model gets that encoder (train.py: whether the data holds any)."""
    gpt = dict(vocab_size=vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
               n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias, pos_emb=cfg.pos_emb,
               smear=cfg.smear, qk_norm=cfg.qk_norm, activation=cfg.activation)
    vision = dict(image_size=cfg.image_size, patch_size=cfg.patch_size, n_layer=cfg.vit_n_layer,
                  n_head=cfg.vit_n_head, n_embd=cfg.vit_n_embd)
    audio_encoder = dict(n_layer=cfg.audio_n_layer, n_head=cfg.audio_n_head, n_embd=cfg.audio_n_embd)
    return dict(gpt=gpt, vision=vision if images else None, audio=audio_encoder if audio else None,
                pixel_shuffle=cfg.pixel_shuffle, audio_stack=cfg.audio_stack, image_pos_emb=cfg.image_pos_emb,
                audio_pos_emb=cfg.audio_pos_emb, projector_norm=cfg.projector_norm, image_token_id=image_token_id,
                audio_token_id=audio_token_id)


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
            max_tokens = audio_tokens(self.audio.config.max_frames, config.audio_stack)
            self.audio_projector = Projector(self.audio.config.n_embd, n_embd, frame_stack=config.audio_stack,
                                             max_tokens=max_tokens if config.audio_pos_emb else None,
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
                segment_ids: torch.Tensor | None = None, reduction: str = "mean", return_logits: bool = True,
                negatives: torch.Tensor | None = None, unlikelihood: float = 0.0):
        """As GPT.forward, with media: returns (logits (B, T, V), loss), or (B, 1, V) logits and None
        without targets, or (None, loss) with return_logits=False. targets: (B, T); any target that is a
        placeholder id becomes -100."""
        x = self.embed(idx, images, audio, audio_lengths)  # (B, T, C)
        if targets is not None:
            placeholder = (targets == self.config.image_token_id) | (targets == self.config.audio_token_id)
            targets = targets.masked_fill(placeholder, -100)  # (B, T)
        return self.gpt(inputs_embeds=x, targets=targets, segment_ids=segment_ids, reduction=reduction,
                        return_logits=return_logits, negatives=negatives, unlikelihood=unlikelihood)

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


# parameter-name prefixes of the encoders and projectors: what media_lr_scale applies to
MEDIA_PARTS = ("vision.", "audio.", "image_projector.", "audio_projector.")


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
