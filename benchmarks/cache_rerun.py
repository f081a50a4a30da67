"""Cache: a second `generate` with the same inputs and cache dir vs the first (issue #7), and a re-run against a cache
holding `--history` times more entries of other prompts, models and corpora vs one holding only the run's own (#15).

Goals: the second run makes zero LLM and zero embedding calls ("pay once") and takes a fraction of the first's time;
a re-run with a cache 10x the run's own size takes at most 1.2x the time of a re-run with a cache of its own size.

Every run is the whole generation pipeline (`pipelines.run.generate`, every stage: query generation, teacher
embeddings, LLM grading + round-trip, LLM negative scoring, counterfactual classification data from the test task
spec) with Gemini as LLM and teacher, pointed at the fake Gemini server (tests/fakes/gemini_server.py) in a process of
its own on 127.0.0.1, answering after `--latency` seconds so every call costs time. The API key is a dummy; nothing
leaves the machine. The corpus is the first `--passages` SciFact passages when ../shared/data/scifact is present,
else the builtin stdlib corpus. Each run is a fresh Python process (so a later one gains nothing from warm imports);
the server's request log is reset between them.

The larger cache is the first run's cache plus, for each of its files, `--history` files like it written through the
cache's own writer (`pipelines.cache.write_cache_file`): one in three has the same prompts, model and task types but
other keys (another corpus), one in three another prompt version or task type, one in three another model. Re-runs
with the two caches alternate, `--repeats` each, each into an output folder of its own; their medians are compared.

Calls are counted twice: server-side (generateContent requests; embedding requests and the texts they carry) and
from the run's manifest (`llm_usage[].calls`, `cache.embeddings_computed`).

    python benchmarks/cache_rerun.py --passages 200 --latency 0.2 --history 10
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
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


def scripted_answer(body: Mapping[str, Any]) -> str:
    """What a capable LLM might answer, chosen by the response schema: a distinct query per passage, every query
    relevant to its passage, every mined candidate "related" (1, kept as a negative); schema examples otherwise.

    Runs in the server process (`--generate benchmarks.cache_rerun:scripted_answer`)."""
    from prompts import data_field
    from tests.fakes.gemini_server import default_generate

    config = body.get("generationConfig", {})
    schema = config.get("responseSchema") or config.get("responseJsonSchema") or {}
    fields = set(schema.get("properties", {}))
    user = body["contents"][-1]["parts"][0]["text"]
    if fields == {"task", "query"}:
        # Three passage words after the first: distinct per passage, and too short a run to count as a copy.
        words = data_field(user, "passage").split()[1:4] or ["nothing"]
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


def run_config(base_url: str, folder: Path, cache: str, output: str, concurrency: int, dimension: int):
    from pipelines.clients.specs import EmbedderSpec, LLMSpec
    from pipelines.config import GenerateConfig
    from pipelines.stages.embed_teacher import EmbedTeacherConfig
    from pipelines.stages.generate_counterfactuals import GenerateCounterfactualsConfig
    from pipelines.stages.grade_relevance import GradeRelevanceConfig
    from pipelines.stages.mine_negatives import MineNegativesConfig
    from pipelines.stages.read_corpus import ReadCorpusConfig

    return GenerateConfig(
        output=str(folder / output),
        cache_dir=str(folder / cache),
        corpus=ReadCorpusConfig(path=str(folder / "passages.jsonl")),
        llm=LLMSpec(backend="gemini", base_url=base_url, concurrency=concurrency),
        teacher=EmbedderSpec(backend="gemini", base_url=base_url, concurrency=concurrency),
        embed=EmbedTeacherConfig(dimension=dimension),
        grading=GradeRelevanceConfig(use_llm=True, use_roundtrip=True, roundtrip_top_k=8),
        mining=MineNegativesConfig(k=8, num_negatives=3, llm_scoring=True, llm_candidates=5),
        counterfactuals=GenerateCounterfactualsConfig(
            task_spec=str(ROOT / "tests" / "data" / "counterfactuals" / "task.yaml"),
            examples_per_label=2, examples_per_request=2, max_seeds_per_label=2),
    )


def worker(base_url: str, folder: Path, cache: str, output: str, concurrency: int, dimension: int,
           result: str) -> None:
    """One `generate`, timed from the call to its return (the manifest written and checked)."""
    from pipelines.run import generate

    config = run_config(base_url, folder, cache, output, concurrency, dimension)
    start = time.perf_counter()
    manifest = generate(config)
    seconds = time.perf_counter() - start
    Path(result).write_text(json.dumps({"seconds": seconds, "manifest": manifest}))


def run_once(server: Any, folder: Path, cache: str, output: str, args: argparse.Namespace) -> dict[str, Any]:
    server.reset()
    with tempfile.NamedTemporaryFile(prefix="bench3_cache_", suffix=".json") as result:
        # Output captured: the live progress table of `generate` would garble the benchmark's own table.
        process = subprocess.run(
            [sys.executable, __file__, "--worker", "--base-url", server.base_url, "--folder", str(folder),
             "--cache", cache, "--output", output, "--concurrency", str(args.concurrency), "--dimension",
             str(args.dimension), "--result", result.name],
            cwd=ROOT, capture_output=True, text=True,
        )
        if process.returncode != 0:
            tail = (process.stdout + process.stderr)[-8000:]
            raise SystemExit(f"generate failed ({process.returncode}):\n{tail}")
        document = json.loads(Path(result.name).read_text())
    document["server"] = server.stats()
    document["load"] = os.getloadavg()[0]
    return document


def _history_rows(rows: list[dict[str, Any]], kind: str, copy: int) -> list[dict[str, Any]]:
    """`rows` as an earlier run might have left them: other keys (another corpus) with the same prompt, model and task
    type, or another prompt version / task type, or another model, by `copy` % 3."""
    variant = copy % 3
    history = []
    for row in rows:
        row = dict(row)
        row["key"] = hashlib.sha256(f"{row['key']}/{copy}".encode()).hexdigest()
        if variant == 1 and kind == "llm":
            row["prompt_version"] = f"{row['prompt_version']}-earlier{copy}"
        elif variant == 1:
            row["task_type"] = "CLASSIFICATION" if row["task_type"] != "CLASSIFICATION" else "CLUSTERING"
        elif variant == 2:
            row["model_id"] = f"{row['model_id']}-earlier{copy}"
        if kind == "embeddings":
            row["text_sha256"] = hashlib.sha256(row["key"].encode()).hexdigest()
        history.append(row)
    return history


def add_history(cache_dir: str, copies: int) -> dict[str, int]:
    """Adds `copies` files like each of the cache's own (see `_history_rows`); returns entries before and added."""
    from pipelines.cache import EMBEDDING_CACHE, LLM_CACHE, cache_files, read_cache_file, write_cache_file

    counts = {"own_entries": 0, "added_entries": 0}
    for kind in (LLM_CACHE, EMBEDDING_CACHE):
        for path in cache_files(cache_dir, kind):
            rows = read_cache_file(path, kind).to_pylist()
            counts["own_entries"] += len(rows)
            for copy in range(1, copies + 1):
                write_cache_file(cache_dir, kind, _history_rows(rows, kind, copy))
                counts["added_entries"] += len(rows)
    return counts


def _calls_line(name: str, result: dict[str, Any], first_seconds: float) -> str:
    server, manifest = result["server"], result["manifest"]
    llm_calls = sum(row["calls"] for row in manifest["llm_usage"])
    embed_requests = sum(count for method, count in server["by_method"].items() if method != "generateContent")
    cache = manifest["cache"]
    return (f"{name:<14} {result['seconds']:>7.1f} {result['seconds'] / first_seconds:>8.3f} "
            f"{server['by_method'].get('generateContent', 0):>8} {embed_requests:>9} {server['texts_embedded']:>6} "
            f"{llm_calls:>18} {cache.get('llm_hits', 0):>8} {cache.get('embeddings_computed', 0):>12} "
            f"{cache.get('embedding_hits', 0):>8} {manifest['outputs'].get('triplets', 0):>8} {result['load']:>6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=100)
    parser.add_argument("--latency", type=float, default=0.1, help="server-side seconds per request")
    parser.add_argument("--concurrency", type=int, default=8, help="LLM and teacher requests in flight")
    parser.add_argument("--dimension", type=int, default=768, help="teacher embedding dimension (Gemini's smallest "
                        "recommended output size)")
    parser.add_argument("--history", type=int, default=10,
                        help="the larger cache holds this many times the run's own entries besides them")
    parser.add_argument("--repeats", type=int, default=3, help="re-runs with each cache, alternating")
    parser.add_argument("--results-name", default="cache_rerun", help="benchmarks/results/<name>.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # A dummy key for the loopback server; GOOGLE_API_KEY would take precedence, so it goes (workers inherit this).
    os.environ.pop("GOOGLE_API_KEY", None)
    os.environ["GEMINI_API_KEY"] = DUMMY_KEY
    if args.worker:
        worker(args.base_url, Path(args.folder), args.cache, args.output, args.concurrency, args.dimension, args.result)
        return

    from quality_runs import write_results  # benchmarks/ is on sys.path when a script in it runs

    from tests.fakes.gemini_server import ServerProcess

    started = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench3_cache_") as temporary:
        folder = Path(temporary)
        source = write_corpus(folder / "passages.jsonl", args.passages)
        print(f"{args.passages} passages from {source}; latency {args.latency * 1000:.0f} ms, concurrency "
              f"{args.concurrency}; load average before {', '.join(f'{x:.2f}' for x in load_before)}")
        with ServerProcess(latency_s=args.latency, generate="benchmarks.cache_rerun:scripted_answer",
                           cwd=str(ROOT)) as server:
            first = run_once(server, folder, "cache", "run-first", args)
            shutil.copytree(folder / "cache", folder / "cache-history")
            history = add_history(str(folder / "cache-history"), args.history)
            print(f"cache-history: {history['own_entries']} own entries + {history['added_entries']} of other "
                  f"prompts, models and corpora")
            reruns: dict[str, list[dict[str, Any]]] = {"own": [], "history": []}
            for repeat in range(args.repeats):
                reruns["own"].append(run_once(server, folder, "cache", f"run-own-{repeat}", args))
                reruns["history"].append(
                    run_once(server, folder, "cache-history", f"run-history-{repeat}", args))

    print(f"{'run':<14} {'wall s':>7} {'x first':>8} {'LLM req':>8} {'embed req':>9} {'texts':>6} "
          f"{'manifest LLM calls':>18} {'LLM hits':>8} {'emb computed':>12} {'emb hits':>8} {'triplets':>8} "
          f"{'load1':>6}")
    print(_calls_line("first", first, first["seconds"]))
    for name, results in reruns.items():
        for repeat, result in enumerate(results):
            print(_calls_line(f"re-run {name} {repeat}", result, first["seconds"]))
    second = reruns["own"][0]
    print("per stage, re-run: " + json.dumps({row["stage"]: {"calls": row["calls"], "cache_hits": row["cache_hits"]}
                                              for row in second["manifest"]["llm_usage"]}))
    medians = {name: statistics.median(result["seconds"] for result in results) for name, results in reruns.items()}
    rerun_requests = sum(result["server"]["requests"] for results in reruns.values() for result in results)
    history_ratio = medians["history"] / medians["own"]
    print(f"re-run / first wall time {medians['own'] / first['seconds']:.3f}; goal zero calls on every re-run: "
          f"{'met' if rerun_requests == 0 else 'MISSED'} ({rerun_requests} requests)")
    print(f"re-run with a cache {1 + args.history}x its own size / with its own: {medians['history']:.1f} s / "
          f"{medians['own']:.1f} s = {history_ratio:.3f} (goal <= 1.2: {'met' if history_ratio <= 1.2 else 'MISSED'}); "
          f"load average after {', '.join(f'{x:.2f}' for x in os.getloadavg())}")

    def summary(result: dict[str, Any]) -> dict[str, Any]:
        cache = result["manifest"]["cache"]
        return {"wall_s": round(result["seconds"], 2), "server_requests": result["server"]["requests"],
                "llm_hits": cache.get("llm_hits", 0), "embedding_hits": cache.get("embedding_hits", 0),
                "load1": round(result["load"], 2)}

    path = write_results(args.results_name, {
        "corpus": source, "cache_entries": history,
        "first": summary(first),
        "reruns": {name: [summary(result) for result in results] for name, results in reruns.items()},
        "median_wall_s": {name: round(value, 2) for name, value in medians.items()},
        "rerun_vs_first": round(medians["own"] / first["seconds"], 3),
        "history_vs_own": round(history_ratio, 3),
        "load_average_before": list(load_before),
    }, {"passages": args.passages, "latency_s": args.latency, "concurrency": args.concurrency,
        "dimension": args.dimension, "history": args.history, "repeats": args.repeats}, started)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
