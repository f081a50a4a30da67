"""The training losses. Each takes embeddings the trainer computed and says which data columns they came from.

Embeddings reaching these functions are unit-length float32 (StudentEncoder's output), so a dot product is a cosine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def truncate(embeddings: torch.Tensor, dim: int) -> torch.Tensor:
    """Matryoshka truncation: first `dim` components, re-normalized to unit length."""
    return nn.functional.normalize(embeddings[..., :dim], dim=-1)


def contrastive_cross_entropy(anchors: torch.Tensor, candidates: torch.Tensor, targets: torch.Tensor,
                              temperature: float) -> torch.Tensor:
    """Cross-entropy of each anchor picking its target among all candidates by cosine / temperature."""
    logits = anchors @ candidates.T / temperature
    return nn.functional.cross_entropy(logits, targets)


def info_nce(queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """InfoNCE with in-batch negatives plus the mined hard negatives.

    Columns: TRIPLET `query` -> queries (B, d), `positive` -> positives (B, d), `negatives` -> negatives (M, d), all
    rows' hard negatives concatenated (M may be 0; rows may have different counts). Query i must pick positive i
    among every positive and every hard negative of the batch; the sampler guarantees no text repeats in a batch, so
    none of those candidates is a hidden copy of the positive.
    """
    candidates = torch.cat([positives, negatives], dim=0)
    targets = torch.arange(queries.shape[0], device=queries.device)
    return contrastive_cross_entropy(queries, candidates, targets, temperature)


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

    Columns: any one column's embeddings, e.g. TRIPLET `query` or `positive` (B, d); pairs i != j are non-matching
    because the sampler never repeats a text in a batch. For uniformly spread unit vectors in d dimensions, the inner
    product has mean 0 and second moment 1/d; the loss penalizes the squared mean M1^2 and the excess of the second
    moment over 1/d, max(0, M2 - 1/d). This keeps the space usable after quantization and Matryoshka truncation.
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
