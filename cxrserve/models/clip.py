"""CLIP in OpenAI's layout (ViT image encoder + causal text transformer), as CheXzero uses it.

The modules and parameter names follow OpenAI's ``clip/model.py`` (which CheXzero
copies), so a CheXzero or OpenAI ViT checkpoint -- a plain state dict -- loads with
``load_state_dict`` unchanged: ``visual.conv1``, ``visual.class_embedding``,
``visual.transformer.resblocks.N.attn.in_proj_weight``, ``token_embedding``,
``positional_embedding``, ``ln_final``, ``text_projection``, ``logit_scale`` ...
:meth:`CLIP.from_state_dict` infers the configuration from the tensor shapes as
``clip.model.build_model`` does (heads = width / 64).

Two departures from OpenAI's code, both output-preserving:

* the text transformer's causal mask is sliced to the token sequence's length, so a
  batch of token ids may be cut to its longest real sequence (end-of-text included)
  before the forward pass; with a causal mask no position ever attends to a later
  one, so the end-of-text features are exactly those of the full 77-token input at a
  fraction of the cost (checked in the tests);
* weights are kept in float32 (OpenAI converts to fp16 for GPUs; checkpoints saved in
  fp16 are cast on import).

:class:`ZeroShotCLIP` (registered as ``clip``) holds one or more CLIP members (an
ensemble of checkpoints, as CheXzero averages several) and returns what serving needs:
``forward(image)`` -> L2-normalised image embeddings ``[N, members, embed_dim]``, and
:meth:`ZeroShotCLIP.encode_text` -> L2-normalised text embeddings ``[T, members, embed_dim]``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cxrserve.models import register_model

#: ViT-B/32, the configuration of OpenAI's ``ViT-B/32`` and of CheXzero's released checkpoints.
VIT_B_32 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
                context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                transformer_layers=12)
CONFIG_KEYS = tuple(VIT_B_32)
#: OpenAI's JIT archives keep these as tensors in the state dict; ``build_model`` drops them.
NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size")


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (OpenAI: fp16 safety)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm attention + MLP block on batch-first ``[N, L, D]`` tensors.

    ``attn`` is an ``nn.MultiheadAttention`` only as the holder of OpenAI's parameter
    names (``in_proj_weight``, ``in_proj_bias``, ``out_proj``); the attention itself is
    written out with reshapes that keep batch and sequence length symbolic, because
    ``nn.MultiheadAttention``'s ONNX export freezes both to the example's sizes.
    """

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, d_model * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(d_model * 4, d_model)),
        ]))
        self.ln_2 = LayerNorm(d_model)

    def attention(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        width = x.shape[-1]
        qkv = F.linear(x, self.attn.in_proj_weight, self.attn.in_proj_bias)
        qkv = qkv.unflatten(-1, (3, self.n_head, width // self.n_head)).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each N, heads, L, head_dim
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return F.linear(out.transpose(1, 2).flatten(2), self.attn.out_proj.weight, self.attn.out_proj.bias)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual attention blocks (batch-first; OpenAI's runs sequence-first)."""

    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int):
        super().__init__()
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            # A grey image repeated on 3 channels (as every CXR is) equals one channel
            # through the channel-summed filters, at a third of the cost (training).
            x = F.conv2d(x, self.conv1.weight.sum(dim=1, keepdim=True), stride=self.conv1.stride)
        else:
            x = self.conv1(x)  # N, width, grid, grid
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, x.shape[-1])
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0, :]) @ self.proj


class CLIP(nn.Module):
    """OpenAI's CLIP with a ViT image encoder (the only kind CheXzero uses)."""

    def __init__(self, embed_dim: int, image_resolution: int, vision_layers: int, vision_width: int,
                 vision_patch_size: int, context_length: int, vocab_size: int, transformer_width: int,
                 transformer_heads: int, transformer_layers: int):
        super().__init__()
        if isinstance(vision_layers, (tuple, list)):
            raise ValueError("ModifiedResNet CLIP image encoders are not supported: CheXzero uses a ViT")
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width, vision_layers,
                                        vision_width // 64 or 1, embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))
        # Causal mask, not a parameter: OpenAI keeps it outside the state dict too.
        mask = torch.full((context_length, context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """OpenAI's initialisation of the text side (the ViT keeps its constructor's)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = (width ** -0.5) * ((2 * layers) ** -0.5)
        attn_std = width ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    @property
    def config(self) -> dict:
        v = self.visual
        return dict(embed_dim=self.text_projection.shape[1], image_resolution=v.input_resolution,
                    vision_layers=len(v.transformer.resblocks), vision_width=v.conv1.out_channels,
                    vision_patch_size=v.conv1.kernel_size[0], context_length=self.context_length,
                    vocab_size=self.vocab_size, transformer_width=self.transformer.width,
                    transformer_heads=self.transformer.resblocks[0].attn.num_heads,
                    transformer_layers=self.transformer.layers)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """Token ids ``[N, L]`` (``L <= context_length``) -> features at each end-of-text token."""
        length = text.shape[1]
        x = self.token_embedding(text) + self.positional_embedding[:length]
        x = self.ln_final(self.transformer(x, self.attn_mask[:length, :length].to(x.dtype)))
        # The end-of-text token has the largest id in CLIP's vocabulary.
        eot = text.argmax(dim=-1)
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """OpenAI's contract: ``(logits_per_image, logits_per_text)``."""
        image_features = F.normalize(self.encode_image(image), dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()

    # ----------------------------------------------------------------- OpenAI checkpoints
    @staticmethod
    def config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict:
        """The constructor arguments, inferred from tensor shapes (``clip.model.build_model``)."""
        if "visual.proj" not in state_dict:
            raise ValueError("not a ViT CLIP state dict (no 'visual.proj'): CheXzero checkpoints use ViT-B/32")
        conv = state_dict["visual.conv1.weight"]
        grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        width = state_dict["ln_final.weight"].shape[0]
        return dict(
            embed_dim=state_dict["text_projection"].shape[1],
            image_resolution=conv.shape[-1] * grid,
            vision_layers=len([k for k in state_dict if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")]),
            vision_width=conv.shape[0],
            vision_patch_size=conv.shape[-1],
            context_length=state_dict["positional_embedding"].shape[0],
            vocab_size=state_dict["token_embedding.weight"].shape[0],
            transformer_width=width,
            transformer_heads=width // 64,
            transformer_layers=len({k.split(".")[2] for k in state_dict if k.startswith("transformer.resblocks.")}),
        )

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> "CLIP":
        """Build and load a CLIP from an OpenAI-layout state dict (fp16 tensors are cast to fp32)."""
        state = clean_state_dict(state_dict)
        model = cls(**cls.config_from_state_dict(state))
        model.load_state_dict(state)
        return model.eval()


def clean_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop OpenAI's non-parameter entries and a ``module.`` (DataParallel) prefix; fp32."""
    out = {}
    for key, value in state_dict.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key in NON_PARAMETER_KEYS:
            continue
        out[key] = value.float() if torch.is_floating_point(value) else value
    return out


class ZeroShotCLIP(nn.Module):
    """One or more CLIP members with the same configuration (a CheXzero ensemble).

    ``forward(image)`` returns the members' L2-normalised image embeddings
    ``[N, members, embed_dim]``; :meth:`encode_text` the same for token ids. Scores are
    averaged over members by the caller (:mod:`cxrserve.families.zeroshot.pipeline`), as CheXzero
    averages its checkpoints' predictions.
    """

    def __init__(self, members: int = 1, **config):
        super().__init__()
        missing = [k for k in CONFIG_KEYS if k not in config]
        if missing:
            raise TypeError(f"missing CLIP configuration: {missing}")
        if members < 1:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList([CLIP(**{k: config[k] for k in CONFIG_KEYS}) for _ in range(members)])

    @property
    def config(self) -> dict:
        return self.members[0].config

    @property
    def context_length(self) -> int:
        return self.members[0].context_length

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.stack([F.normalize(m.encode_image(image), dim=-1) for m in self.members], dim=1)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        return torch.stack([F.normalize(m.encode_text(text), dim=-1) for m in self.members], dim=1)

    @classmethod
    def from_state_dicts(cls, state_dicts: list[Mapping[str, torch.Tensor]]) -> "ZeroShotCLIP":
        """An ensemble of OpenAI-layout state dicts; every member must have the same configuration."""
        if not state_dicts:
            raise ValueError("no state dicts given")
        cleaned = [clean_state_dict(sd) for sd in state_dicts]
        configs = [CLIP.config_from_state_dict(sd) for sd in cleaned]
        for i, config in enumerate(configs[1:], start=1):
            if config != configs[0]:
                diff = {k: (configs[0][k], config[k]) for k in config if config[k] != configs[0][k]}
                raise ValueError(f"checkpoint {i} has a different configuration from checkpoint 0: {diff}")
        model = cls(members=len(cleaned), **configs[0])
        for member, sd in zip(model.members, cleaned):
            member.load_state_dict(sd)
        return model.eval()


class TextEncoder(nn.Module):
    """The text half alone, for export: token ids ``[T, L]`` -> ``[T, members, embed_dim]``."""

    def __init__(self, model: ZeroShotCLIP):
        super().__init__()
        self.model = model

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(text)


@register_model("clip")
def clip(members: int = 1, **config) -> ZeroShotCLIP:
    """CLIP (OpenAI layout) ensemble; ``config`` as OpenAI's ``CLIP(...)`` arguments."""
    return ZeroShotCLIP(members=members, **config)
