"""The training losses. Each takes embeddings the trainer computed and says which data columns they came from.

Embeddings reaching these functions are unit-length float32 (StudentEncoder's output), so a dot product is a cosine.
Batches are full, so one passage may sit in a batch more than once (several queries of one passage, mined negatives
that recur): `in_batch_negative_mask` says which in-batch candidates are not negatives of a query, and `info_nce`
leaves those out of that query's softmax.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn


def truncate(embeddings: torch.Tensor, dim: int) -> torch.Tensor:
    """Matryoshka truncation: first `dim` components, re-normalized to unit length."""
    return nn.functional.normalize(embeddings[..., :dim], dim=-1)


def contrastive_cross_entropy(anchors: torch.Tensor, candidates: torch.Tensor, targets: torch.Tensor,
                              temperature: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of each anchor picking its target among all candidates by cosine / temperature.

    `mask` (anchors, candidates), True = leave that candidate out of that anchor's softmax (its logit becomes -inf,
    exactly as if it were absent). Never mask an anchor's target.
    """
    logits = anchors @ candidates.T / temperature
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    return nn.functional.cross_entropy(logits, targets)


class CandidateMask(NamedTuple):
    #: (B, B + M) bool, True where the candidate is not a negative of query i (left out of its softmax).
    masked: torch.Tensor
    #: Masked because the candidate is query i's own positive passage in another column: a false negative.
    false_negatives: int
    #: Masked because the candidate repeats a passage already among query i's candidates.
    repeats: int


def passage_groups(keys: Sequence[tuple[str, str]]) -> list[int]:
    """One group number per candidate (passage id, text): candidates sharing a non-empty id or a text, directly or
    through others, are one passage. The number is the group's first candidate index."""
    parent = list(range(len(keys)))

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    first: dict[tuple[str, str], int] = {}
    for index, (passage_id, text) in enumerate(keys):
        for key in ((("id", passage_id),) if passage_id else ()) + (("text", text),):
            if key in first:
                low, high = sorted((root(first[key]), root(index)))
                parent[high] = low
            else:
                first[key] = index
    return [root(index) for index in range(len(keys))]


def in_batch_negative_mask(positives: Sequence[tuple[str, str]], negatives: Sequence[tuple[str, str]],
                           device: torch.device | str = "cpu") -> CandidateMask:
    """Which in-batch candidates each query must not be scored against, for `info_nce`.

    Columns: TRIPLET `positive_id` / `positive` of each row -> positives, B (passage id, text) pairs; `negative_ids` /
    `negatives` of every row, concatenated in row order -> negatives, M pairs; an id of "" is unknown (the text alone
    then says which passage it is). The candidates are `info_nce`'s: the B positives, then the M negatives.

    For query i:
      1. every candidate that is the same passage as positive i (same id, or same text), other than positive i itself,
         is masked: it is a false negative (another query of the same passage, or the passage mined as another row's
         hard negative). Positive i stays: it is the target;
      2. every repeat of another passage is masked, its first occurrence kept: each distinct passage counts once in
         the softmax. A recurring mined negative (a hub passage) would otherwise weigh as many times as it recurs,
         and the loss would depend on how often the miner picked it rather than on how hard it is.
    """
    groups = torch.tensor(passage_groups([*positives, *negatives]), dtype=torch.long, device=device)
    count, columns = len(positives), len(groups)
    column = torch.arange(columns, device=device)
    same = groups[None, :] == groups[:count, None]
    own = column[None, :] == torch.arange(count, device=device)[:, None]
    # A group's number is its first column: every other column of the group is a repeat.
    first = groups == column
    false_negatives = same & ~own
    repeats = ~same & ~first[None, :]
    return CandidateMask(false_negatives | repeats, int(false_negatives.sum()), int(repeats.sum()))


def info_nce(queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
             temperature: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE with in-batch negatives plus the mined hard negatives.

    Columns: TRIPLET `query` -> queries (B, d), `positive` -> positives (B, d), `negatives` -> negatives (M, d), all
    rows' hard negatives concatenated (M may be 0; rows may have different counts). Query i must pick positive i
    among every positive and every hard negative of the batch, except the candidates `mask` (B, B + M) leaves out:
    pass `in_batch_negative_mask(...).masked`, so a copy of positive i elsewhere in the batch is not a negative of
    query i (batches are full, and passages repeat in them).
    """
    candidates = torch.cat([positives, negatives], dim=0)
    targets = torch.arange(queries.shape[0], device=queries.device)
    return contrastive_cross_entropy(queries, candidates, targets, temperature, mask)


def score_margins(queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                  owners: torch.Tensor) -> torch.Tensor:
    """cos(query, positive) - cos(query, negative) for each negative (N,); negative n belongs to row owners[n]."""
    queries, positives, negatives = (nn.functional.normalize(tensor.float(), dim=-1)
                                     for tensor in (queries, positives, negatives))
    return (queries * positives).sum(dim=-1)[owners] - (queries[owners] * negatives).sum(dim=-1)


def margin_mse(queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, *, owners: torch.Tensor,
               teacher_queries: torch.Tensor, teacher_positives: torch.Tensor,
               teacher_negatives: torch.Tensor) -> torch.Tensor:
    """Margin distillation (MarginMSE, Hofstaetter et al. 2020, as GPL uses it): the student's score margin between
    the positive and each hard negative regresses onto the teacher's.

    Columns: TRIPLET `query`, `positive`, `negatives` -> the student's queries (R, d), positives (R, d) and negatives
    (N, d) of the R rows that have teacher vectors (their negatives concatenated; `owners` (N,) is each negative's
    row); `query_embedding`, `positive_embedding`, `negative_embeddings` (the cached teacher vectors) -> teacher_*
    (R, D), (R, D), (N, D), any D. Scores are cosines on both sides, so the teacher's dimension never needs a
    projection. Mean squared error over the N (row, negative) pairs.

    Unlike embedding matching it only asks the student to rank like the teacher by the same gaps, not to reproduce the
    teacher's space; unlike InfoNCE it keeps how much better the positive is, so a near-miss negative is not pushed
    as far as an unrelated one.
    """
    student = score_margins(queries, positives, negatives, owners)
    with torch.no_grad():
        teacher = score_margins(teacher_queries, teacher_positives, teacher_negatives, owners).to(student.dtype)
    return nn.functional.mse_loss(student, teacher)


def matryoshka(loss: Callable[..., torch.Tensor], dims: Sequence[int], *embeddings: torch.Tensor,
               **kwargs) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Matryoshka representation learning: `loss` at each truncation of every embedding tensor, averaged.

    Returns the average and the loss per dimension (for logging). With no dims, the full dimension alone.
    Equal weights per dimension, as in the MRL paper and Gemini Embedding.
    """
    full = embeddings[0].shape[-1]
    per_dim = {}
    for dim in dims or (full,):
        per_dim[dim] = loss(*(truncate(tensor, dim) if dim < full else tensor for tensor in embeddings), **kwargs)
    return torch.stack(list(per_dim.values())).mean(), per_dim


class EmbeddingMatching(nn.Module):
    """Embedding-matching distillation (EmbeddingGemma): pull student embeddings onto the teacher's.

    Columns: TRIPLET `query_embedding`, `positive_embedding`, `negative_embeddings` (the cached teacher vectors) are
    the targets for the student embeddings of `query`, `positive` and `negatives`; rows where they are null are left
    out by the trainer. Matching hard negatives too carries the teacher's fine-grained ranking of near misses, which
    the contrastive loss alone flattens.

    When the teacher's dimension differs from the student's, a learned linear map (no bias) takes student vectors to
    the teacher's size. It is a training-only head: it is saved in checkpoints, never in the final model.

    Cosine, not MSE: teacher vectors are unit length and retrieval only ever reads cosines, so only the direction of
    the projected student vector matters. MSE on the raw projection would also spend capacity on fitting norms (and
    on unit vectors it equals 2 - 2 cos anyway).
    """

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.projection = nn.Linear(student_dim, teacher_dim, bias=False) if student_dim != teacher_dim else None

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.projection is not None:
            student = self.projection(student)
        student = nn.functional.normalize(student, dim=-1)
        teacher = nn.functional.normalize(teacher.to(student.dtype), dim=-1)
        return (1.0 - (student * teacher).sum(dim=-1)).mean()


def global_orthogonal_regularization(embeddings: torch.Tensor) -> torch.Tensor:
    """Spread-out regularizer (Zhang et al. 2017, as used by EmbeddingGemma): unrelated embeddings ~ orthogonal.

    Columns: any one column's embeddings, e.g. TRIPLET `query` or `positive` (B, d), one row per distinct passage or
    text (the trainer drops repeats: a text twice in a batch is a matching pair, counted as a maximally
    non-orthogonal pair the loss cannot move), so pairs i != j are non-matching. For uniformly spread unit vectors in
    d dimensions, the inner product has mean 0 and second moment 1/d; the loss penalizes the squared mean M1^2 and the
    excess of the second moment over 1/d, max(0, M2 - 1/d). This keeps the space usable after quantization and
    Matryoshka truncation.
    """
    count, dim = embeddings.shape
    if count < 2:
        return embeddings.sum() * 0.0
    similarities = embeddings @ embeddings.T
    off_diagonal = ~torch.eye(count, dtype=torch.bool, device=embeddings.device)
    values = similarities[off_diagonal]
    first_moment = values.mean()
    second_moment = (values ** 2).mean()
    return first_moment ** 2 + torch.clamp(second_moment - 1.0 / dim, min=0.0)


def label_classification(texts: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor,
                         temperature: float) -> torch.Tensor:
    """Classification as retrieval of the label description (InfoNCE over label descriptions).

    Columns: CLASSIFICATION_EXAMPLE `text` -> texts (B, d); `label_description` of `label` and of every label in
    `negative_labels` -> labels (L, d), one row per distinct label of the batch's task; targets (B,) index each text's
    own label. The other labels are the negatives; other texts are not (they may share the label).
    """
    return contrastive_cross_entropy(texts, labels, targets, temperature)
