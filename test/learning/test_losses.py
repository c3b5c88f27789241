"""Losses: the MNN local loss (SelaVPR), triplet losses, multi-similarity, distillation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vpr_ros.learning.losses import (
    mnn_local_loss,
    mnn_similarity,
    multi_similarity_loss,
    relational_distillation_loss,
    triplet_losses,
)
from vpr_ros.rerankers.mnn import mutual_nn_matches


def brute_force_mnn(a: np.ndarray, b: np.ndarray) -> tuple[list[tuple[int, int]], float]:
    """Mutual nearest neighbours by explicit loops, and their mean similarity."""
    matches = []
    for i in range(len(a)):
        sims = [float(a[i] @ b[j]) for j in range(len(b))]
        j = int(np.argmax(sims))
        back = [float(a[k] @ b[j]) for k in range(len(a))]
        if int(np.argmax(back)) == i:
            matches.append((i, j))
    mean = float(np.mean([a[i] @ b[j] for i, j in matches])) if matches else 0.0
    return matches, mean


def test_mnn_matcher_agrees_with_a_brute_force_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(3, 20, 8, generator=gen), dim=-1)
    b = F.normalize(torch.randn(3, 25, 8, generator=gen), dim=-1)
    got = mnn_similarity(a, b)
    for k in range(3):
        matches, mean = brute_force_mnn(a[k].numpy(), b[k].numpy())
        assert len(matches) > 0
        assert got[k].item() == pytest.approx(mean, abs=1e-6)
        rows, cols = mutual_nn_matches(a[k], b[k])
        assert sorted(zip(rows.tolist(), cols.tolist())) == matches


def test_mnn_similarity_is_differentiable_through_the_matched_similarities() -> None:
    gen = torch.Generator().manual_seed(1)
    a = F.normalize(torch.randn(1, 10, 4, generator=gen), dim=-1).requires_grad_()
    b = F.normalize(torch.randn(1, 12, 4, generator=gen), dim=-1)
    mnn_similarity(a, b).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0


def official_local_similarity(query: torch.Tensor, pred: torch.Tensor) -> float:
    """SelaVPR's training similarity of one pair (local_matching.py, ``trainflag``),
    restated: the matches are the query positions whose best prediction position points
    back at them; one match (the official index tensor squeezes to a scalar) falls back to
    the mean over positions of <query_l, pred_l>."""
    sim = pred @ query.T  # (L pred, L query), the official orientation
    best_pred = sim.argmax(dim=0)  # per query position
    best_query = sim.argmax(dim=1)  # per prediction position
    matched = torch.nonzero(best_query[best_pred] == torch.arange(len(query))).flatten()
    if len(matched) == 1:
        return float((query * pred).sum(dim=1).mean())
    return float((query[matched] * pred[best_pred[matched]]).sum(dim=1).mean())


def one_match_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Three positions whose only mutual match is (0, 0): every query position's best
    prediction position is 0, whose best query position is 0."""
    query = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.8, 0.0, 0.6]])
    pred = torch.eye(3)
    return query, pred


def test_a_single_mnn_match_falls_back_to_the_position_wise_mean_as_in_selavpr() -> None:
    query, pred = one_match_pair()
    rows, cols = mutual_nn_matches(query, pred)
    assert list(zip(rows.tolist(), cols.tolist())) == [(0, 0)]
    got = mnn_similarity(query[None], pred[None])
    # (<q0, p0> + <q1, p1> + <q2, p2>) / 3 = (1 + 0.6 + 0.6) / 3, not the match's 1.0
    assert got.item() == pytest.approx(2.2 / 3, abs=1e-6)
    assert got.item() == pytest.approx(official_local_similarity(query, pred), abs=1e-6)
    query = query.clone().requires_grad_()
    mnn_similarity(query[None], pred[None]).sum().backward()
    assert query.grad is not None and (query.grad.abs().sum(dim=1) > 0).all()  # every position


def test_mnn_similarity_equals_the_official_training_similarity_pair_by_pair() -> None:
    gen = torch.Generator().manual_seed(4)
    query = F.normalize(torch.randn(8, 3, 3, generator=gen), dim=-1)
    pred = F.normalize(torch.randn(8, 3, 3, generator=gen), dim=-1)
    single_q, single_p = one_match_pair()
    query, pred = torch.cat([query, single_q[None]]), torch.cat([pred, single_p[None]])
    got = mnn_similarity(query, pred)
    expected = [official_local_similarity(q, p) for q, p in zip(query, pred)]
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    counts = [len(mutual_nn_matches(q, p)[0]) for q, p in zip(query, pred)]
    assert 1 in counts and max(counts) >= 2  # both branches are exercised


def test_mnn_local_loss_is_a_hinge_of_negative_minus_positive_similarity() -> None:
    gen = torch.Generator().manual_seed(2)
    q = F.normalize(torch.randn(2, 16, 8, generator=gen), dim=-1)
    other = F.normalize(torch.randn(2, 16, 8, generator=gen), dim=-1)
    assert mnn_local_loss(q, q, other).item() == 0.0  # positive identical: s_p = 1 >= s_n
    expected = (1.0 - mnn_similarity(q, other)).mean().item()
    assert mnn_local_loss(q, other, q).item() == pytest.approx(expected, abs=1e-6)


def test_triplet_losses_read_the_batch_as_query_positive_negatives_groups() -> None:
    gen = torch.Generator().manual_seed(3)
    glob = F.normalize(torch.randn(2, 4, 8, generator=gen), dim=-1)  # 2 groups: q, p, n1, n2
    local = F.normalize(torch.randn(2, 4, 8, 3, 3, generator=gen), dim=2)
    out = {'global_descriptor': glob.reshape(8, 8), 'local_features': local.reshape(8, 8, 3, 3)}
    losses = triplet_losses(out, 2, margin=0.1, local_weight=0.5, local_margin=0.2)
    q, p, n = glob[:, :1].expand(-1, 2, -1), glob[:, 1:2].expand(-1, 2, -1), glob[:, 2:]
    d_pos, d_neg = (q - p).norm(dim=-1), (q - n).norm(dim=-1)
    expected_global = torch.clamp(d_pos - d_neg + 0.1, min=0).mean()
    assert losses['global'].item() == pytest.approx(expected_global.item(), abs=1e-5)
    sets = local.flatten(3).transpose(2, 3)  # (2, 4, 9, 8)
    lq, lp, ln = (
        sets[:, :1].expand(-1, 2, -1, -1).reshape(4, 9, 8),
        sets[:, 1:2].expand(-1, 2, -1, -1).reshape(4, 9, 8),
        sets[:, 2:].reshape(4, 9, 8),
    )
    expected_local = mnn_local_loss(lq, lp, ln, 0.2)
    assert losses['local'].item() == pytest.approx(expected_local.item(), abs=1e-6)
    total = losses['global'] + 0.5 * losses['local']
    assert losses['loss'].item() == pytest.approx(total.item(), abs=1e-6)


def test_metric_and_distillation_losses_prefer_the_right_ranking() -> None:
    a = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=1)
    swapped = a[[0, 2, 1]]
    positive = torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    negative = torch.tensor([[0, 0, 1], [0, 0, 1], [1, 1, 0]], dtype=torch.bool)
    assert multi_similarity_loss(a, positive, negative) < multi_similarity_loss(
        swapped, positive, negative
    )
    assert float(relational_distillation_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(relational_distillation_loss(swapped, a)) > 0.1


def test_distillation_compares_rankings_across_descriptor_sizes() -> None:
    gen = torch.Generator().manual_seed(4)
    teacher = F.normalize(torch.randn(5, 16, generator=gen), dim=1)
    student = F.normalize(teacher[:, :8] + 0.01 * torch.randn(5, 8, generator=gen), dim=1)
    shuffled = student[[1, 2, 3, 4, 0]]
    close = relational_distillation_loss(student, teacher)
    assert close < relational_distillation_loss(shuffled, teacher)
