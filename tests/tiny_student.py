"""A tiny random BERT student folder (sentence-transformers layout, as `embforge train` writes) for tests that train or
quantize in well under a second a step: 2 layers, hidden size 32.

The feed-forward width is 320 so that a row of the feed-forward output layer holds 320 weights: more than int8's 255
codes, so a test of "at most 255 distinct values per channel" fails on float weights.
"""

from __future__ import annotations

import os

from tests.shard_factory import LABELS, TOPICS

#: Hidden size (the student's embedding dimension) and the feed-forward width.
HIDDEN, FEED_FORWARD = 32, 320


def write_tiny_student(folder: str, seed: int = 0) -> str:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    from embedder.config import DEFAULT_TASK_PROMPTS
    from embedder.model import StudentEncoder

    words = sorted({word for keywords in TOPICS.values() for word in keywords}
                   | {word.strip(".,").lower() for text in LABELS.values() for word in text.split()})
    os.makedirs(folder, exist_ok=True)
    vocab_path = os.path.join(folder, "vocab.txt")
    with open(vocab_path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=5 + len(words), hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=FEED_FORWARD, max_position_embeddings=64)
    student = StudentEncoder(BertModel(config), BertTokenizer(vocab_file=vocab_path), max_seq_length=32,
                             prompts=DEFAULT_TASK_PROMPTS)
    os.remove(vocab_path)
    return student.save(folder)
