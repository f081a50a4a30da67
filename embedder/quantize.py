"""int8 quantization of output embeddings, the scheme the evaluator reports int8 figures under.

Separate from the evaluator because it is a property of the vectors a deployment stores, not of how they are scored.

Symmetric, one scale per dimension, calibrated on the vectors a deployment would store (the corpus; the train set for
classification): scale_j = max_i |x_ij| / 127, code = clip(round(x / scale), -127, 127). Queries and test texts are
quantized with that same scale (values beyond the calibrated range clip). Scores are dot products of the dequantized
vectors (code * scale), i.e. what an int8 index scores after reconstructing its vectors. Each component's round-trip
error is at most scale_j / 2 (within the calibrated range), which bounds the score error:
|x.y - x'.y'| <= sum_j (|x_j| + |y'_j|) * scale_j / 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The scheme in one line, as evaluation reports state it.
INT8_SCHEME = ("symmetric per-dimension scale = max |x| / 127 on the corpus (classification: train) embeddings; "
               "queries/test clipped to that range; scores on dequantized vectors")


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

