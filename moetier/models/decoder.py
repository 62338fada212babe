"""The decoder stack every family shares; families supply attention and MLP per layer.

Parameter names follow the Hugging Face checkpoints (``model.layers.N.self_attn...``)
so that a family's weight map only lists what differs.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..runtime.batch import ForwardBatch
from .args import BaseModelArgs
from .layers import RMSNorm


Norm = Callable[[int], nn.Module]  # hidden size -> a norm module (RMSNorm unless a family says otherwise)


def rms_norm(args: BaseModelArgs) -> Norm:
    return lambda dim: RMSNorm(dim, args.rms_norm_eps)


def layer_norm(args: BaseModelArgs) -> Norm:
    """LayerNorm with weight and bias (Phi-3.5-MoE), eps read from ``rms_norm_eps`` as transformers does."""
    return lambda dim: nn.LayerNorm(dim, eps=args.rms_norm_eps)


def fused_step(fused, x: torch.Tensor, batch: ForwardBatch) -> bool:
    """Whether a step takes a fused decode path (``models/fused.py``): one bf16 decode token of each sequence, no
    more of them than the path's ``max_batch``."""
    return (fused is not None and x.dtype == torch.bfloat16 and x.shape[0] <= fused.max_batch
            and all(n == 1 for n in batch.lengths))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention, then MLP or sparse MoE."""

    def __init__(self, args: BaseModelArgs, attn: nn.Module, mlp: nn.Module, norm: Norm | None = None):
        super().__init__()
        norm = norm or rms_norm(args)
        self.input_layernorm = norm(args.hidden_size)
        self.self_attn = attn
        self.post_attention_layernorm = norm(args.hidden_size)
        self.mlp = mlp
        self.fused = None  # models/fused.py: a decode token of each sequence in three native calls

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        if fused_step(self.fused, x, batch):
            return self.fused(x, batch)
        x = x + self.self_attn(self.input_layernorm(x), batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, args: BaseModelArgs, layers: list[DecoderLayer], norm: Norm | None = None):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = (norm or rms_norm(args))(args.hidden_size)


class CausalLM(nn.Module):
    """Embeddings, decoder layers, final norm and LM head.

    ``forward`` takes the flat token ids of a step (``[T]``) and returns logits
    only for the rows asked for (by default each sequence's last token).
    ``embed_scale`` multiplies the embeddings and ``logits_scale`` divides the logits
    (Granite's embedding_multiplier and logits_scaling); ``lm_head_bias`` gives the head a bias.
    """

    def __init__(
        self, args: BaseModelArgs, make_layer: Callable[[int], DecoderLayer], *, norm: Norm | None = None,
        lm_head_bias: bool = False, embed_scale: float = 1.0, logits_scale: float = 1.0,
    ):
        super().__init__()
        self.args = args
        self.model = DecoderModel(args, [make_layer(i) for i in range(args.num_hidden_layers)], norm)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=lm_head_bias)
        self.embed_scale, self.logits_scale = embed_scale, logits_scale
        self.fused_token = None  # models/fused.py: a decode token of one or more sequences through all layers at once

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on final-normed rows ``[R, H]`` -> logits ``[R, vocab]`` in the model's dtype."""
        logits = self.lm_head(hidden)
        return logits if self.logits_scale == 1.0 else logits / self.logits_scale

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, batch: ForwardBatch, logits_rows: torch.Tensor | None = None,
        hidden_rows: torch.Tensor | None = None,
    ):
        """input_ids ``[T]`` -> logits ``[rows, vocab]`` in float32.

        With ``hidden_rows`` ``[R]``, returns ``(logits, hidden)``, ``hidden`` ``[R, H]`` being those
        rows after the final norm: the caller runs the LM head on them in chunks (prompt logprobs).
        """
        x = self.model.embed_tokens(input_ids)  # [T, H]
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        if fused_step(self.fused_token, x, batch):
            x = self.fused_token(x, batch)
        else:
            for layer in self.model.layers:
                x = layer(x, batch)
        if logits_rows is None:
            logits_rows = batch.last_token_indices()
        logits = self.head(self.model.norm(x[logits_rows.to(x.device)])).float()
        if hidden_rows is None:
            return logits
        return logits, self.model.norm(x[hidden_rows.to(x.device)])
