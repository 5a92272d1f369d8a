"""Models built in code: tiny CNNs for smoke tests and CI (real layers, seconds to export and
build), and BERT encoders from a transformers config (random weights, no download)."""

from __future__ import annotations

import torch
from torch import nn


def tiny_cnn(num_classes: int = 10, width: int = 16) -> nn.Module:
    """`width`: the first conv's channels (the second has twice as many); modelopt leaves convs of
    16 channels or fewer out of FP8 (too small to gain), so FP8 tests widen it."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


@torch.library.custom_op("pipeline_zoo::soft_clip", mutates_args=())
def soft_clip(x: torch.Tensor, limit: float) -> torch.Tensor:
    """A custom operator: no exporter or engine knows it, so it must stay in PyTorch."""
    return limit * torch.tanh(x / limit)


@soft_clip.register_fake
def _(x: torch.Tensor, limit: float) -> torch.Tensor:
    return torch.empty_like(x)


class CustomOpNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(soft_clip(self.stem(x), 3.0))


def custom_op_net(num_classes: int = 10) -> nn.Module:
    return CustomOpNet(num_classes)


class BertEncoder(nn.Module):
    """transformers' BertModel behind a plain-tensor interface.

    BertModel.forward takes a dozen optional arguments plus **kwargs and returns a
    ModelOutput (a dict subclass holding None fields and a cache slot), while export's
    dynamic_shapes are keyed by the forward's parameter names and engines and validation
    compare tuples of tensors. The wrapper fixes the signature to the two inputs a
    tokenizer gives (`input_ids`, `attention_mask`: int64 [batch, sequence], passed as
    keywords) and returns plain tensors: (last_hidden_state [batch, sequence, hidden],
    pooler_output [batch, hidden]).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.bert = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return out.last_hidden_state, out.pooler_output


def bert(
    hidden_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    intermediate_size: int,
    vocab_size: int = 30522,
    max_position_embeddings: int = 512,
    attn_implementation: str = "sdpa",
) -> nn.Module:
    """A BERT encoder from a config, with random weights (seeded by the caller; no download).

    "sdpa" (the default) exports one aten.scaled_dot_product_attention node per layer, which
    lowering keeps and torch.onnx converts (MatMul/Softmax at opset 20); "eager" traces the
    same attention as separate matmul, mul, softmax and dropout ops. Both export with dynamic
    batch and sequence sizes.
    """
    from transformers import BertConfig, BertModel  # heavy: only for the models that need it

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        attn_implementation=attn_implementation,
    )
    return BertEncoder(BertModel(config, add_pooling_layer=True))


class DataDependentNet(CustomOpNet):
    """A CNN with a data-dependent op in the middle, for fallback around it.

    The stem's positive activations are gathered with `masked_select` (output length
    depends on the values, an unbacked size in torch.export) and their median becomes a
    threshold the head subtracts. torch.onnx has no conversion for aten.masked_select
    (nor aten.median), so both stay in PyTorch between two accelerated blocks. Only the
    median reads the variable-length tensor and it is 0-d, so the blocks around it see
    static (or batch-dynamic) shapes, and the output is [batch, num_classes] whatever the
    data. (torch.export also emits size assertions on the unbacked length, which a
    partitioner must drop or keep in PyTorch, never put in an accelerated block.)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stem(x)
        active = torch.masked_select(features, features > 0)
        threshold = active.median()  # nan when nothing is active, like any empty median
        return self.head(features - threshold)


def data_dependent_net(num_classes: int = 10) -> nn.Module:
    return DataDependentNet(num_classes)


def vit_b_16(weights: str | None = None, **kwargs) -> nn.Module:
    """torchvision's ViT-B/16, with a head that says something under random weights.

    torchvision zero-initialises the classification head (`heads.head`), so with random
    weights the logits are all zero whatever the input: validation would compare zeros
    with zeros and learn nothing. Random weights (weights=None) get a normal head instead,
    drawn from the generator build_model seeds with model.seed; pretrained weights
    (weights="DEFAULT", ...) load exactly as torchvision gives them.
    """
    from torchvision.models import vit_b_16 as torchvision_vit_b_16

    model = torchvision_vit_b_16(weights=weights, **kwargs)
    if weights is None:
        nn.init.normal_(model.heads.head.weight, std=0.02)
        nn.init.normal_(model.heads.head.bias, std=0.02)
    return model
