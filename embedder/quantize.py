"""int8 and binary quantization of output embeddings, the schemes the evaluator reports them under.

Separate from the evaluator because it is a property of the vectors a deployment stores, not of how they are scored.

Symmetric, one scale per dimension, calibrated on the vectors a deployment would store (the corpus; the train set for
classification): scale_j = max_i |x_ij| / 127, code = clip(round(x / scale), -127, 127). Queries and test texts are
quantized with that same scale (values beyond the calibrated range clip). Scores are dot products of the dequantized
vectors (code * scale), i.e. what an int8 index scores after reconstructing its vectors. Each component's round-trip
error is at most scale_j / 2 (within the calibrated range), which bounds the score error:
|x.y - x'.y'| <= sum_j (|x_j| + |y'_j|) * scale_j / 2.

Binary: one bit per dimension, the sign (x_j > 0), packed 8 to a byte (32x smaller than float32). Search ranks
passages by Hamming distance to the query's bits (faiss `IndexBinaryFlat`); with rescoring, the `RESCORE_FACTOR` x k
nearest by Hamming are re-ranked by the float query against the float passage vectors, which a deployment keeps on
disk and reads only for those candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

#: The scheme in one line, as evaluation reports state it.
INT8_SCHEME = ("symmetric per-dimension scale = max |x| / 127 on the corpus (classification: train) embeddings; "
               "queries/test clipped to that range; scores on dequantized vectors")


BINARY_SCHEME = ("sign bit per dimension, Hamming-distance search; binary+rescore: the {factor} x k nearest by Hamming "
                 "re-ranked by float query . float passage")
#: Candidates rescored per result kept: 4 x k, sentence-transformers' default `rescore_multiplier`.
RESCORE_FACTOR = 4


@dataclass(frozen=True)
class Int8Quantizer:
    """Symmetric per-dimension int8 quantization (see the module docstring for the scheme and its error bound)."""

    #: Step per dimension, shape (d,): max |x_j| over the calibration vectors / 127.
    scale: np.ndarray

    @classmethod
    def calibrate(cls, vectors: np.ndarray) -> Int8Quantizer:
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(f"int8 calibration needs a non-empty (n, d) array, got shape {vectors.shape}")
        peak = np.abs(vectors).max(axis=0).astype(np.float32)
        # A dimension that is zero on every calibration vector gets any positive step: its codes are 0 either way.
        return cls(np.where(peak > 0, peak / 127.0, 1.0 / 127.0).astype(np.float32))

    def quantize(self, vectors: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(vectors / self.scale), -127, 127).astype(np.int8)

    def dequantize(self, codes: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(codes.astype(np.float32) * self.scale)

    def roundtrip(self, vectors: np.ndarray) -> np.ndarray:
        return self.dequantize(self.quantize(vectors))



def pack_signs(vectors: np.ndarray) -> np.ndarray:
    """(n, d) float -> (n, ceil(d / 8)) uint8: bit j is 1 where x_j > 0 (a dimension count not divisible by 8 is padded
    with 0 bits on every vector alike, so the padding never adds to a distance)."""
    return np.packbits(vectors > 0, axis=1)


def hamming_search(corpus_bits: np.ndarray, query_bits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Hamming distances, corpus indices), each (n_queries, min(k, n_corpus)), nearest first."""
    index = faiss.IndexBinaryFlat(corpus_bits.shape[1] * 8)
    index.add(np.ascontiguousarray(corpus_bits))
    return index.search(np.ascontiguousarray(query_bits), min(k, len(corpus_bits)))


def binary_search(corpus: np.ndarray, queries: np.ndarray, k: int, rescore: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scores, corpus indices), best first: -Hamming distance, or with `rescore` the float dot products of the
    `RESCORE_FACTOR * k` nearest by Hamming, of which the best k are kept."""
    candidates = RESCORE_FACTOR * k if rescore else k
    distances, indices = hamming_search(pack_signs(corpus), pack_signs(queries), candidates)
    if not rescore:
        return -distances.astype(np.float32), indices
    scores = np.einsum("qd,qcd->qc", queries, corpus[indices])
    best = np.argsort(-scores, axis=1, kind="stable")[:, :min(k, indices.shape[1])]
    return np.take_along_axis(scores, best, axis=1), np.take_along_axis(indices, best, axis=1)
