"""The encoder-decoder family (T5, Zhao et al. §4.2.1) built from the decoder's blocks.

The encoder attends both ways over the input; the decoder attends causally over what it
has generated and, in every layer, across to the encoder's output. Embeddings are shared
by both stacks (and by the LM head when tied, where T5 scales the decoder output by
d_model^-½ first, since its embeddings are not scaled on the way in).
"""

from __future__ import annotations

import torch
from torch import nn

from lmlab.model.config import ModelConfig, deepnorm_constants
from lmlab.model.transformer import (
    AttnContext,
    Block,
    KVCache,
    PositionTables,
    RelativePositionBias,
    build_masks,
    init_weights,
    make_norm,
    positions_from,
)


class Stack(nn.Module):
    """A stack of blocks with its own relative-position bias and final norm."""

    def __init__(self, cfg: ModelConfig, n_layers: int, cross: bool, alpha: float) -> None:
        super().__init__()
        self.cfg = cfg
        self.cross = cross
        if cfg.position == "t5":
            self.rel_pos_bias = RelativePositionBias(cfg)
        self.layers = nn.ModuleList(Block(cfg, cross=cross, alpha=alpha) for _ in range(n_layers))
        if cfg.has_final_norm:
            self.norm = make_norm(cfg)
        self._tables = PositionTables(cfg)

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        start = cache.pos if cache is not None else 0
        device = x.device
        pos = positions_from(attention_mask, start, t, device)
        if cfg.position == "sinusoidal":
            x = x + self._tables.sinusoidal_at(pos).to(x.dtype)
        masks, is_causal = build_masks(
            cfg,
            t,
            start,
            device,
            x.dtype,
            causal=self.cross,  # the decoder is causal, the encoder sees everything
            key_mask=attention_mask,
            pos_bias=getattr(self, "rel_pos_bias", None),
            layers=len(self.layers),
        )
        cos = sin = None
        if cfg.position == "rope":
            cos, sin = self._tables.rope_at(pos)
        ctx = AttnContext(cos, sin, masks, is_causal)
        cross_ctx = None
        if memory is not None:
            cross_mask = None
            if memory_mask is not None:  # [B, S_enc] -> bool [B, 1, 1, S_enc]
                cross_mask = memory_mask.bool()[:, None, None, :]
            cross_ctx = AttnContext(None, None, {False: cross_mask}, False)
        for i, layer in enumerate(self.layers):
            x = layer(x, ctx, i, cache, memory, cross_ctx)
        if cache is not None:
            cache.advance(t)
        return self.norm(x) if cfg.has_final_norm else x


class EncoderDecoder(nn.Module):
    """`forward(input_ids, decoder_input_ids) -> logits[B, T_dec, vocab_size]`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.family != "encoder_decoder":
            raise ValueError(f"EncoderDecoder needs family encoder_decoder, got {cfg.family}")
        self.cfg = cfg
        consts = {"encoder": (1.0, 1.0), "decoder": (1.0, 1.0)}
        if cfg.deepnorm:
            consts = deepnorm_constants(cfg.n_layers, cfg.n_decoder_layers)
        self.embed_tokens = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.encoder = Stack(cfg, cfg.n_layers, cross=False, alpha=consts["encoder"][0])
        self.decoder = Stack(cfg, cfg.n_decoder_layers, cross=True, alpha=consts["decoder"][0])
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        cfg = self.cfg
        betas = {"encoder": 1.0, "decoder": 1.0}
        if cfg.deepnorm:
            betas = {
                k: v[1] for k, v in deepnorm_constants(cfg.n_layers, cfg.n_decoder_layers).items()
            }
        init_weights(self.encoder, cfg, cfg.n_layers, betas["encoder"])
        init_weights(self.decoder, cfg, cfg.n_decoder_layers, betas["decoder"])
        nn.init.normal_(self.embed_tokens.weight, 0.0, cfg.init_std)
        if cfg.small_embed_init:
            nn.init.uniform_(self.embed_tokens.weight, -1e-4, 1e-4)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, 0.0, cfg.init_std)

    def aux_loss(self) -> torch.Tensor | None:
        if not self.cfg.n_experts:
            return None
        layers = [*self.encoder.layers, *self.decoder.layers]
        return self.cfg.moe_aux_loss_coef * sum(b.mlp.aux_loss for b in layers) / len(layers)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return self.encoder(self.embed_tokens(input_ids), attention_mask)

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        memory: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = self.embed_tokens(decoder_input_ids)
        h = self.decoder(x, decoder_attention_mask, memory, attention_mask, cache)
        if self.cfg.tie_embeddings:
            h = h * self.cfg.d_model**-0.5
        return self.lm_head(h)[..., : self.cfg.vocab_size]

    def forward(
        self,
        input_ids: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        memory = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, memory, attention_mask, decoder_attention_mask)


def build_model(cfg: ModelConfig) -> nn.Module:
    """The module for any family: `Transformer` for decoders, `EncoderDecoder` for T5-style."""
    from lmlab.model.transformer import Transformer

    return EncoderDecoder(cfg) if cfg.family == "encoder_decoder" else Transformer(cfg)
