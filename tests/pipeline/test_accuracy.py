"""The one comparator (pipeline.accuracy): one decision for all-zero, constant and non-finite outputs.

Validate and the int8/fp8 rounds both judge with it, so a round that passes is judged by
the same rules validate applies later.
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.accuracy import NOT_FINITE, compare, failures, figures

STRICT = {"max_abs_err": 1e-6, "rel_l2_err": 1e-6, "min_cosine_similarity": 0.9999, "min_top1_agreement": 1.0}
OPEN = {"max_abs_err": None, "rel_l2_err": None, "min_cosine_similarity": None, "min_top1_agreement": None}


def samples(*tensors: torch.Tensor) -> list[list[torch.Tensor]]:
    return [[t] for t in tensors]


def test_validate_and_the_rounds_use_this_comparator():
    import pipeline.quantized_build as rounds
    import stages.validate as validate

    assert validate.compare is compare and rounds.compare is compare and rounds.failures is failures


def test_all_zero_outputs_are_equal_and_flagged_constant():
    zeros = samples(torch.zeros(2, 10), torch.zeros(2, 10))
    acc = compare(zeros, zeros, classifier=True)
    assert acc["cosine_similarity"] == 1.0 and acc["rel_l2_err"] == 0.0 and acc["max_abs_err"] == 0.0
    assert acc["finite"] and acc["constant"] and failures(acc, STRICT) == []


def test_zeros_against_non_zeros_stay_wrong():
    acc = compare(samples(torch.zeros(2, 10)), samples(torch.ones(2, 10)), classifier=False)
    assert acc["cosine_similarity"] == 0.0 and acc["max_abs_err"] == 1.0
    assert "cosine_similarity=0 (must be >= 0.9999)" in failures(acc, STRICT)


def test_constant_outputs_compare_as_they_are_and_are_flagged():
    ref = samples(torch.full((2, 10), 3.0), torch.full((2, 10), 3.0))
    same = compare(ref, ref, classifier=False)
    assert same["constant"] and same["cosine_similarity"] == pytest.approx(1.0) and failures(same, STRICT) == []
    off = compare(ref, samples(torch.full((2, 10), 3.5), torch.full((2, 10), 3.5)), classifier=False)
    assert off["constant"] and off["max_abs_err"] == pytest.approx(0.5) and failures(off, STRICT)
    varied = torch.arange(20.0).reshape(2, 10)
    assert not compare(samples(varied), samples(varied), classifier=False)["constant"]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_compiled_outputs_get_the_worst_figures_and_always_fail(bad):
    ref = samples(torch.randn(2, 10, generator=torch.Generator().manual_seed(0)))
    got = [[ref[0][0].clone()]]
    got[0][0][0, 3] = bad
    acc = compare(ref, got, classifier=True)
    assert not acc["finite"] and acc["max_abs_err"] == math.inf and acc["rel_l2_err"] == math.inf
    assert acc["cosine_similarity"] == -1.0  # ordered below every finite round, never NaN
    assert failures(acc, OPEN) == [NOT_FINITE]  # even with every gate disabled
    assert set(figures(acc)) == {"max_abs_err", "rel_l2_err", "cosine_similarity", "top1_agreement"}


def test_top1_agreement_for_classifier_logits_only():
    ref = samples(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    got = samples(torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    assert compare(ref, got, classifier=True)["top1_agreement"] == 0.5
    assert "top1_agreement" not in compare(ref, got, classifier=False)
    assert "top1_agreement=0.5 (must be >= 1)" in failures(compare(ref, got, classifier=True), STRICT)
