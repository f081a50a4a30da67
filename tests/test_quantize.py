"""Quantization of output embeddings: int8's round-trip error bound, clipping and a dimension that is always zero;
binary sign bits, Hamming search and float rescoring."""

from __future__ import annotations

import numpy as np

from embedder.quantize import RESCORE_FACTOR, Int8Quantizer, binary_search, hamming_search, pack_signs


def test_int8_roundtrip_stays_within_half_a_step_and_bounds_the_score_error():
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((500, 64)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = corpus[:40] + 0.05 * rng.standard_normal((40, 64)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    quantizer = Int8Quantizer.calibrate(corpus)
    codes = quantizer.quantize(corpus)
    assert codes.dtype == np.int8 and np.abs(codes.astype(int)).max() == 127  # the peak of each dimension uses +-127
    assert np.all(np.abs(quantizer.roundtrip(corpus) - corpus) <= quantizer.scale / 2 + 1e-7)

    # |x.y - x'.y'| <= sum_j (|x_j| + |y'_j|) * scale_j / 2 for in-range values (queries may clip, so use corpus ones).
    x, y = corpus[:40], corpus[100:140]
    x_hat, y_hat = quantizer.roundtrip(x), quantizer.roundtrip(y)
    error = np.abs(x @ y.T - x_hat @ y_hat.T)
    bound = (np.abs(x) * quantizer.scale / 2).sum(1)[:, None] + (np.abs(y_hat) * quantizer.scale / 2).sum(1)[None, :]
    assert np.all(error <= bound + 1e-6)
    # In practice scores of unit vectors move by a few thousandths, so the nearest passage stays the nearest.
    query_scores, query_scores_int8 = queries @ corpus.T, quantizer.roundtrip(queries) @ quantizer.roundtrip(corpus).T
    assert np.abs(query_scores - query_scores_int8).mean() < 0.005
    assert np.mean(query_scores.argmax(1) == query_scores_int8.argmax(1)) == 1.0


def test_int8_clips_beyond_the_calibrated_range_and_survives_a_zero_dimension():
    corpus = np.array([[0.5, 0.0], [-0.25, 0.0]], dtype=np.float32)
    quantizer = Int8Quantizer.calibrate(corpus)
    assert np.all(np.isfinite(quantizer.scale)) and np.all(quantizer.scale > 0)
    assert quantizer.quantize(np.array([[1.0, 0.0]], dtype=np.float32)).tolist() == [[127, 0]]
    assert quantizer.quantize(corpus).tolist() == [[127, 0], [-64, 0]]  # -0.25 / (0.5 / 127) = -63.5 -> -64


def test_sign_bits_pack_eight_to_a_byte_and_hamming_search_counts_differing_signs():
    corpus = np.array([[1, 1, 1, 1, 1, 1, 1, 1, 1, -1],
                       [-1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
                       [-1, -1, -1, -1, -1, -1, -1, -1, -1, -1]], dtype=np.float32)
    bits = pack_signs(corpus)
    assert bits.dtype == np.uint8 and bits.shape == (3, 2)  # 10 dimensions -> 2 bytes, the padding bits all 0
    assert bits[0].tolist() == [0b11111111, 0b10000000]
    query = np.ones((1, 10), dtype=np.float32)
    distances, indices = hamming_search(bits, pack_signs(query), k=3)
    assert distances.tolist() == [[1, 1, 10]] and indices[0, 2] == 2


def test_float_rescoring_reorders_the_hamming_candidates_by_their_dot_product():
    # Same signs, so Hamming ties them; the float scores tell them apart.
    corpus = np.array([[0.1, 0.995], [0.995, 0.1], [-0.7, -0.7]], dtype=np.float32)
    query = np.array([[0.9, 0.2]], dtype=np.float32)
    scores, indices = binary_search(corpus, query, k=2, rescore=True)
    assert indices.tolist() == [[1, 0]] and np.allclose(scores, [query @ corpus[[1, 0]].T])
    scores, indices = binary_search(corpus, query, k=2, rescore=False)
    assert scores.tolist() == [[0.0, 0.0]] and set(indices[0]) == {0, 1}
    assert RESCORE_FACTOR * 2 > len(corpus)  # every passage was a candidate: min(k, n) keeps the search valid
