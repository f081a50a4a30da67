"""Cache: a second `generate` with the same inputs and cache dir vs the first: wall time ratio and calls (issue #7).

Goal: the second run makes zero LLM and zero embedding calls ("pay once"), and takes a fraction of the first's time.

Both runs are the whole generation pipeline (`pipelines.run.generate`, every stage: query generation, teacher
embeddings, LLM grading + round-trip, LLM negative scoring, counterfactual classification data from the test task
spec) with Gemini as LLM and teacher, pointed at the fake Gemini server (tests/fakes/gemini_server.py) in a process of
its own on 127.0.0.1, answering after `--latency` seconds so every call costs time. The API key is a dummy; nothing
leaves the machine. The corpus is the first `--passages` SciFact passages when ../shared/data/scifact is present,
else the builtin stdlib corpus. Each run is a fresh Python process (so the second gains nothing from warm imports);
the server's request log is reset between them.

Calls are counted twice: server-side (generateContent requests; embedding requests and the texts they carry) and
from the run's manifest (`llm_usage[].calls`, `cache.embeddings_computed`).

    python benchmarks/cache_rerun.py --passages 100 --latency 0.1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python benchmarks/x.py` puts benchmarks/ first, not the repo root

DUMMY_KEY = "bench3-dummy-key"


def _tag(text: str, tag: str) -> str:
    start, end = text.find(f"<{tag}>"), text.find(f"</{tag}>")
    return text[start + len(tag) + 2:end].strip() if 0 <= start < end else ""


def scripted_answer(body: Mapping[str, Any]) -> str:
    """What a capable LLM might answer, chosen by the response schema: a distinct query per passage, every query
    relevant to its passage, every mined candidate "related" (1, kept as a negative); schema examples otherwise.

    Runs in the server process (`--generate benchmarks.cache_rerun:scripted_answer`)."""
    from tests.fakes.gemini_server import default_generate

    config = body.get("generationConfig", {})
    schema = config.get("responseSchema") or config.get("responseJsonSchema") or {}
    fields = set(schema.get("properties", {}))
    user = body["contents"][-1]["parts"][0]["text"]
    if fields == {"task", "query"}:
        # Three passage words after the first: distinct per passage, and too short a run to count as a copy.
        words = _tag(user, "passage").split()[1:4] or ["nothing"]
        return json.dumps({"task": "Given a claim, retrieve passages that support it",
                           "query": f"evidence on {' '.join(words)}"})
    if fields == {"reason", "relevance"}:
        return json.dumps({"reason": "answers the query", "relevance": 3})
    if fields == {"relevance"}:
        return json.dumps({"relevance": 1})
    return default_generate(body)


def write_corpus(path: Path, passages: int) -> str:
    """JSONL corpus of `passages` rows; returns where they came from."""
    from tests.shared_data import find_shared_data

    shared = find_shared_data()
    corpus = shared / "scifact" / "corpus.jsonl" if shared else None
    rows = []
    if corpus is not None and corpus.exists():
        source = f"SciFact corpus ({corpus})"
        with corpus.open() as handle:
            for line in handle:
                record = json.loads(line)
                rows.append({"id": record["_id"], "title": record.get("title", ""), "text": record["text"]})
                if len(rows) == passages:
                    break
    else:
        from pipelines.stdlib_corpus import stdlib_records

        source = "builtin stdlib corpus"
        rows = stdlib_records(passages)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return source


def run_config(base_url: str, folder: Path, concurrency: int):
    from pipelines.clients.specs import EmbedderSpec, LLMSpec
    from pipelines.config import GenerateConfig
    from pipelines.stages.embed_teacher import EmbedTeacherConfig
    from pipelines.stages.generate_counterfactuals import GenerateCounterfactualsConfig
    from pipelines.stages.grade_relevance import GradeRelevanceConfig
    from pipelines.stages.mine_negatives import MineNegativesConfig
    from pipelines.stages.read_corpus import ReadCorpusConfig

    return GenerateConfig(
        output=str(folder / "run"),
        cache_dir=str(folder / "cache"),
        corpus=ReadCorpusConfig(path=str(folder / "passages.jsonl")),
        llm=LLMSpec(backend="gemini", base_url=base_url, concurrency=concurrency),
        teacher=EmbedderSpec(backend="gemini", base_url=base_url, concurrency=concurrency),
        embed=EmbedTeacherConfig(dimension=64),
        grading=GradeRelevanceConfig(use_llm=True, use_roundtrip=True, roundtrip_top_k=8),
        mining=MineNegativesConfig(k=8, num_negatives=3, llm_scoring=True, llm_candidates=5),
        counterfactuals=GenerateCounterfactualsConfig(
            task_spec=str(ROOT / "tests" / "data" / "counterfactuals" / "task.yaml"),
            examples_per_label=2, examples_per_request=2, max_seeds_per_label=2),
    )


def worker(base_url: str, folder: Path, concurrency: int, output: str) -> None:
    """One `generate`, timed from the call to its return (the manifest written and checked)."""
    from pipelines.run import generate

    config = run_config(base_url, folder, concurrency)
    start = time.perf_counter()
    manifest = generate(config)
    seconds = time.perf_counter() - start
    Path(output).write_text(json.dumps({"seconds": seconds, "manifest": manifest}))


def run_once(base_url: str, folder: Path, concurrency: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(prefix="bench3_cache_", suffix=".json") as output:
        # Output captured: the live progress table of `generate` would garble the benchmark's own table.
        process = subprocess.run(
            [sys.executable, __file__, "--worker", "--base-url", base_url, "--folder", str(folder),
             "--concurrency", str(concurrency), "--output", output.name],
            cwd=ROOT, capture_output=True, text=True,
        )
        if process.returncode != 0:
            tail = (process.stdout + process.stderr)[-8000:]
            raise SystemExit(f"generate failed ({process.returncode}):\n{tail}")
        return json.loads(Path(output.name).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=100)
    parser.add_argument("--latency", type=float, default=0.1, help="server-side seconds per request")
    parser.add_argument("--concurrency", type=int, default=8, help="LLM and teacher requests in flight")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # A dummy key for the loopback server; GOOGLE_API_KEY would take precedence, so it goes (workers inherit this).
    os.environ.pop("GOOGLE_API_KEY", None)
    os.environ["GEMINI_API_KEY"] = DUMMY_KEY
    if args.worker:
        worker(args.base_url, Path(args.folder), args.concurrency, args.output)
        return

    from tests.fakes.gemini_server import ServerProcess

    with tempfile.TemporaryDirectory(prefix="bench3_cache_") as temporary:
        folder = Path(temporary)
        source = write_corpus(folder / "passages.jsonl", args.passages)
        print(f"{args.passages} passages from {source}; latency {args.latency * 1000:.0f} ms, concurrency "
              f"{args.concurrency}; load average before {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
        results = []
        with ServerProcess(latency_s=args.latency, generate="benchmarks.cache_rerun:scripted_answer",
                           cwd=str(ROOT)) as server:
            for _ in range(2):
                server.reset()
                result = run_once(server.base_url, folder, args.concurrency)
                result["server"] = server.stats()
                result["load"] = os.getloadavg()[0]
                results.append(result)

    print(f"{'run':<7} {'wall s':>7} {'x first':>8} {'LLM req':>8} {'embed req':>9} {'texts':>6} "
          f"{'manifest LLM calls':>18} {'LLM hits':>8} {'emb computed':>12} {'emb hits':>8} {'triplets':>8} "
          f"{'load1':>6}")
    for name, result in zip(("first", "second"), results, strict=True):
        server, manifest = result["server"], result["manifest"]
        llm_calls = sum(row["calls"] for row in manifest["llm_usage"])
        embed_requests = sum(count for method, count in server["by_method"].items() if method != "generateContent")
        cache = manifest["cache"]
        print(f"{name:<7} {result['seconds']:>7.1f} {result['seconds'] / results[0]['seconds']:>8.3f} "
              f"{server['by_method'].get('generateContent', 0):>8} {embed_requests:>9} {server['texts_embedded']:>6} "
              f"{llm_calls:>18} {cache.get('llm_hits', 0):>8} {cache.get('embeddings_computed', 0):>12} "
              f"{cache.get('embedding_hits', 0):>8} {manifest['outputs'].get('triplets', 0):>8} {result['load']:>6.2f}")
    second = results[1]
    print("per stage, second run: " + json.dumps({row["stage"]: {"calls": row["calls"], "cache_hits": row["cache_hits"]}
                                                  for row in second["manifest"]["llm_usage"]}))
    zero = second["server"]["requests"] == 0
    print(f"second / first wall time {second['seconds'] / results[0]['seconds']:.3f}; goal zero calls on the second "
          f"run: {'met' if zero else 'MISSED'} ({second['server']['requests']} requests); load average after "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
