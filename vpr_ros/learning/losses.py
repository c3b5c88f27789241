"""Losses for learning place descriptors.

* SelaVPR's (``triplet_losses``): a triplet margin loss on the global descriptors plus
  ``local_weight`` times the MNN local loss, a hinge between the mean similarity of the
  mutual-nearest-neighbour matches of the (query, negative) local feature maps and that of
  the (query, positive) maps (``mnn_local_loss``). The matching is the re-ranker's
  (``vpr_ros.rerankers.mnn.mutual_nn_mask``).
* ``multi_similarity_loss`` (Wang et al. 2019) over in-batch pairs with place labels.
* ``relational_distillation_loss``: keeps a student's in-batch similarity ranking close to
  a teacher's, across descriptor sizes (a pruned model learning from the unpruned one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vpr_ros.rerankers.mnn import mutual_nn_mask


def mnn_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean similarity of the mutual-nearest-neighbour matches between local feature sets.

    Differentiable through the similarities (the matching itself is not). The matching is
    the one of ``vpr_ros.rerankers.mnn.mutual_nn_matches``. As in the official SelaVPR loss, a
    pair with fewer than two matches falls back to the position-wise mean
    ``mean_l <a_l, b_l>`` (the features at the same grid position). The official code
    takes that branch for exactly one match (its index tensor squeezes to a scalar);
    without any match, which needs exact ties since the largest similarity is always
    mutual, it averages an empty set (NaN), and the fallback is used here instead.

    Args:
        a: (B, L, C) L2-normalised local features.
        b: (B, L, C) L2-normalised local features on the same grid.

    Returns:
        (B,) mean cosine similarity over the MNN matches of each pair.
    """
    sim = a @ b.transpose(1, 2)  # (B, L1, L2)
    mutual, nn12 = mutual_nn_mask(sim.detach())
    best = torch.gather(sim, 2, nn12.unsqueeze(-1)).squeeze(-1)  # (B, L1)
    count = mutual.sum(dim=1)
    matched = (best * mutual).sum(dim=1) / count.clamp(min=1)
    if a.shape[1] != b.shape[1]:  # no common grid: no position-wise fallback
        return matched
    position_wise = (a * b).sum(dim=-1).mean(dim=1)
    return torch.where(count >= 2, matched, position_wise)


def mnn_local_loss(
    query: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float = 0.0
) -> torch.Tensor:
    """SelaVPR's local loss: mean of ``max(0, s(q, n) - s(q, p) + margin)``.

    Args:
        query: (B, L, C) local features of the queries.
        positive: (B, L, C) local features of their positives (see ``mnn_similarity`` for
            pairs with fewer than two matches).
        negative: (B, L, C) local features of their negatives.
        margin: hinge margin (0 in the paper).
    """
    sim_pos = mnn_similarity(query, positive)
    sim_neg = mnn_similarity(query, negative)
    return torch.clamp(sim_neg - sim_pos + margin, min=0.0).mean()


def _as_local_sets(local: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, h * w, C)."""
    return local.flatten(2).transpose(1, 2)


def triplet_losses(
    out: dict[str, torch.Tensor],
    negs_per_query: int,
    *,
    margin: float,
    local_weight: float,
    local_margin: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Global triplet + MNN local losses of a batch laid out as ``[q, p, n1..nk] * B``.

    Args:
        out: the model's output for the batch (``global_descriptor``, ``local_features``).
        negs_per_query: k, the negatives after each (query, positive).
        margin: the global triplet margin.
        local_weight: weight of the local loss in the total.
        local_margin: the local hinge margin.

    Returns:
        ``{'loss', 'global', 'local'}``: the total and its two parts, each a mean over the
        B * k triplets.
    """
    group = 2 + negs_per_query
    glob = out['global_descriptor'].reshape(-1, group, out['global_descriptor'].shape[-1])
    local = _as_local_sets(out['local_features'])
    local = local.reshape(-1, group, *local.shape[1:])
    k = negs_per_query
    q = glob[:, :1].expand(-1, k, -1).reshape(-1, glob.shape[-1])
    p = glob[:, 1:2].expand(-1, k, -1).reshape(-1, glob.shape[-1])
    n = glob[:, 2:].reshape(-1, glob.shape[-1])
    global_loss = F.triplet_margin_loss(q, p, n, margin=margin, p=2)
    lq = local[:, :1].expand(-1, k, -1, -1).reshape(-1, *local.shape[2:])
    lp = local[:, 1:2].expand(-1, k, -1, -1).reshape(-1, *local.shape[2:])
    ln = local[:, 2:].reshape(-1, *local.shape[2:])
    local_loss = mnn_local_loss(lq, lp, ln, local_margin)
    return {
        'loss': global_loss + local_weight * local_loss,
        'global': global_loss,
        'local': local_loss,
    }


def multi_similarity_loss(
    descriptors: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
) -> torch.Tensor:
    """Multi-similarity loss (Wang et al. 2019) over in-batch pairs.

    Args:
        descriptors: (B, D) L2-normalised.
        positive: (B, B) bool, pairs of the same place (diagonal excluded by the caller).
        negative: (B, B) bool, pairs of different places.
        alpha: scale of the positive terms.
        beta: scale of the negative terms.
        base: the similarity the terms are centred on.

    Returns:
        The mean over anchors of the soft positive and negative terms.
    """
    sim = descriptors @ descriptors.T
    pos_term = _masked_softplus_lse(-alpha * (sim - base), positive) / alpha
    neg_term = _masked_softplus_lse(beta * (sim - base), negative) / beta
    return (pos_term + neg_term).mean()


def _masked_softplus_lse(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise log(1 + sum(exp(logits[mask]))), 0 for rows without a masked entry."""
    logits = logits.masked_fill(~mask, float('-inf'))
    zeros = torch.zeros(len(logits), 1, dtype=logits.dtype)
    return torch.logsumexp(torch.cat([zeros, logits], dim=1), dim=1)


def relational_distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.05
) -> torch.Tensor:
    """KL(teacher || student) between each image's softmax over its in-batch similarities.

    Works across descriptor sizes (only similarities are compared), so a pruned model
    with a smaller D can learn the unpruned model's ranking of places.

    Args:
        student: (B, D1) L2-normalised descriptors of the model that learns.
        teacher: (B, D2) L2-normalised descriptors of the same images by the teacher.
        temperature: softmax temperature.
    """
    eye = torch.eye(len(student), dtype=torch.bool)
    s = (student @ student.T / temperature).masked_fill(eye, float('-inf'))
    t = (teacher @ teacher.T / temperature).masked_fill(eye, float('-inf'))
    log_s = F.log_softmax(s, dim=1).masked_fill(eye, 0.0)
    log_t = F.log_softmax(t, dim=1).masked_fill(eye, 0.0)
    return (log_t.exp() * (log_t - log_s)).sum(dim=1).mean()


__all__ = [
    'mnn_local_loss',
    'mnn_similarity',
    'multi_similarity_loss',
    'relational_distillation_loss',
    'triplet_losses',
]
