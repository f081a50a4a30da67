"""The `human_queries` ceiling of `quality_scifact.py`: SciFact's train-split claims, written by people, as the queries.

`embforge generate` runs unchanged (copy filters, round-trip grading, the teacher, positive-aware mining) except for
who writes the queries: `claim_writer` is a custom LLM backend (`generate.llm.backend=custom`) that answers each
query-generation prompt with a train-split claim that cites the prompt's passage. Training and evaluation are the
headline's. The corpus of this run is the passages train-split claims cite, so every passage has a human query.

If this data lifts the student and the local LLM's does not, the LLM's queries are what limit the figure; if neither
does, the training recipe or the student is. Only the train split is read (its qrels and claims); the test split's
queries and judgements stay unread until evaluation, as for the `few_shot` lever.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipelines.clients.base import LLM, ChatMessage, GenerationConfig, GenerationResult, Usage
from prompts import data_field

#: The environment variable naming the claims file `claim_writer` answers from (set for the `generate` child process).
CLAIMS_ENV = "EMBFORGE_TRAIN_SPLIT_CLAIMS"
#: SciFact's task, as a user would describe it (the task field every answer carries).
TASK = "Given a scientific claim, retrieve documents that support or refute it"
#: Characters of a passage's start that identify it inside a prompt (with its title).
KEY_CHARS = 120


def passage_key(title: str, text: str) -> str:
    return " ".join(title.split()) + "\n" + " ".join(text.split())[:KEY_CHARS]


def train_split(data: Path) -> tuple[dict[str, str], dict[str, dict], list[tuple[str, str]]]:
    """SciFact's claims by id, its corpus rows by id and the train split's (claim id, passage id) judgements, in file
    order: what a reader of the train split needs. The test split's judgements are never opened."""
    queries = {row["_id"]: row["text"] for row in map(json.loads, (data / "queries.jsonl").read_text().splitlines())}
    corpus = {row["_id"]: row for row in map(json.loads, (data / "corpus.jsonl").read_text().splitlines())}
    judged = [(fields[0], fields[1]) for fields in (line.split("\t") for line in
              (data / "qrels" / "train.tsv").read_text().splitlines()[1:] if line.strip())]
    return queries, corpus, judged


def write_train_split_inputs(data: Path, target: Path, seed: int) -> tuple[Path, Path]:
    """`corpus.jsonl`: the corpus rows train-split claims cite; `claims.json`: each one's claim, keyed by
    `passage_key` (one claim, drawn with `seed`, where several cite the passage). Kept once written."""
    corpus_path, claims_path = target / "corpus.jsonl", target / "claims.json"
    if corpus_path.exists() and claims_path.exists():
        return corpus_path, claims_path
    queries, corpus, judged = train_split(data)
    citing: dict[str, list[str]] = {}
    for query_id, passage_id in judged:
        citing.setdefault(passage_id, []).append(query_id)
    rng = np.random.default_rng(seed)
    cited = sorted(citing)
    claims = {passage_key(corpus[passage_id]["title"], corpus[passage_id]["text"]):
              queries[sorted(citing[passage_id])[rng.integers(len(citing[passage_id]))]] for passage_id in cited}
    target.mkdir(parents=True, exist_ok=True)
    corpus_path.write_text("".join(json.dumps(corpus[passage_id]) + "\n" for passage_id in cited))
    claims_path.write_text(json.dumps(claims, indent=0))
    return corpus_path, claims_path


class ClaimWriter(LLM):
    """Answers a query-generation prompt with the train-split claim citing its passage; a prompt whose passage no
    claim cites gets a failed result, which the stage counts as `llm_failed` like any failed answer."""

    model_id = "scifact-train-claims"
    model_version = "1"

    def __init__(self, claims: dict[str, str]):
        super().__init__()
        self.claims = claims

    def generate(self, messages: Sequence[ChatMessage], output_model, config: GenerationConfig = GenerationConfig()):
        content = messages[-1].content
        key = passage_key(data_field(content, "title"), data_field(content, "passage"))
        usage = Usage(sum(len(message.content.split()) for message in messages), 0)
        claim = self.claims.get(key)
        if claim is None:
            self.stats.record(usage=usage, failed=True)
            return GenerationResult(ok=False, value=None, raw="", error="no train-split claim cites this passage",
                                    usage=usage)
        raw = json.dumps({"task": TASK, "query": claim})
        usage = Usage(usage.input_tokens, len(claim.split()))
        self.stats.record(usage=usage)
        return GenerationResult(ok=True, value=output_model.model_validate_json(raw), raw=raw, usage=usage)


def claim_writer() -> ClaimWriter:
    """Factory for `generate.llm.model=benchmarks.train_split_queries:claim_writer`."""
    path = os.environ.get(CLAIMS_ENV)
    if not path:
        raise RuntimeError(f"claim_writer needs ${CLAIMS_ENV}: the claims.json write_train_split_inputs wrote")
    return ClaimWriter(json.loads(Path(path).read_text()))
