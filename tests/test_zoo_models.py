"""Models of pipeline/zoo.py that need more than the tiny CNNs: BERT from transformers, and a
CNN with a data-dependent op no ONNX-based target converts.

Cheap checks, independent of the input config: models are built from the composed model
config only and fed tensors made here.
"""

from __future__ import annotations

import pytest
import torch
from testkit import compose

from pipeline.models import build_model


def _bert_inputs(batch: int, seq: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[1:, seq // 2:] = 0  # padding in all but the first row
    return {"input_ids": torch.randint(0, 30522, (batch, seq), generator=gen), "attention_mask": mask}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bert_tiny_is_seeded_and_returns_hidden_states(tmp_path):
    pytest.importorskip("transformers")
    cfg = compose(tmp_path, "model=bert_tiny")
    assert cfg.model.task != "classification"  # no top-1 agreement on hidden states
    first, again = build_model(cfg.model), build_model(cfg.model)
    assert not first.training
    assert _same_weights(first, again)
    reseeded = compose(tmp_path, "model=bert_tiny", "model.seed=1")
    assert not _same_weights(first, build_model(reseeded.model))

    with torch.no_grad():
        hidden, pooled = first(**_bert_inputs(2, 16))
    assert hidden.shape == (2, 16, 128) and hidden.dtype == torch.float32
    assert pooled.shape == (2, 128)
    assert torch.isfinite(hidden).all() and torch.isfinite(pooled).all()


def test_data_dependent_net_keeps_its_data_dependent_op_in_pytorch(tmp_path):
    from pipeline.targets.onnxruntime import OnnxRuntimeTarget
    from stages.partition import propose

    model = build_model(compose(tmp_path, "model=data_dependent_net").model)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
        # The gathered activations' count depends on the values, not only on the shapes.
        counts = {int((model.stem(v) > 0).sum()) for v in (x, -x, x * 3 + 1)}
    assert expected.shape == (2, 10) and len(counts) > 1

    program = torch.export.export(model, (x,), strict=False)
    target = OnnxRuntimeTarget({})
    gm = target.graph_module(target.lower(program))
    by_op = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            by_op.setdefault(str(node.target).removeprefix("torch.ops."), []).append(node)
    (masked_select,) = by_op["aten.masked_select.default"]
    (median,) = by_op["aten.median.default"]
    assert not target.is_supported(masked_select)
    assert not target.is_supported(median)
    stem_conv, _, head_conv = by_op["aten.conv2d.default"]
    assert target.is_supported(stem_conv) and target.is_supported(head_conv)

    # Accelerated blocks on both sides: the stem's before the gather, the head's after the median.
    blocks = [set(b) for b in propose(gm, target, set(), min_block_size=3, full=False)]
    assert not {masked_select, median} & set().union(*blocks)
    (stem,) = [b for b in blocks if stem_conv in b]
    (head,) = [b for b in blocks if head_conv in b]
    assert stem is not head
    with torch.no_grad():
        assert torch.allclose(gm(x), expected)
