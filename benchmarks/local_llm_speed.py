"""Offline LLM speed: queries/s of LocalLLM one request at a time vs batched with shared prefixes (issue #12 item 5).

Goal: `generate_many` (prompt prefixes the requests share run once, answers decoded together) writes >= 3x the queries
per second of one `generate` per request (the path every request took before), with the same answers.

The packaged SmolLM2-135M-Instruct is loaded once. The prompts are GenerateQueries' own (`build_requests` with the
default GenerateQueriesConfig: one query per passage, query types rotated over passages, greedy, 96 output tokens) for
the first --passages SciFact passages (`<shared data>/scifact/corpus.jsonl`, found with
`tests.shared_data.find_shared_data`), else for the built-in stdlib corpus. Each repeat times both paths over all the
prompts, alternating which goes first (old, new, then new, old, ...) so that a drift in machine load hits both alike:

- old: `LocalLLM.generate` for each request in turn.
- new: one `LocalLLM.generate_many` over all of them, `--batch-size` answers at a time.

Every answer (raw text, ok, usage) of every run is compared with the first old run's: greedy answers may differ only
where floating point breaks a near-tie the other way (a batched matrix product sums in another order), and the
differing requests are listed. Also printed: prompt tokens, and how many of them the new path runs through the model
(`plan_prefix_tree`: the shared prefixes once, each prompt's own suffix).

Prints queries/s per run, the mean of each path and their ratio against the goal; writes
benchmarks/results/local_llm_speed.json (figures, settings, date, machine, torch threads, load averages). Times on a
machine others are using mean little: run it alone. At the default size it takes a few minutes on 2 idle cores.

    python benchmarks/local_llm_speed.py                          # 32 passages, batch 8, 2 repeats
    python benchmarks/local_llm_speed.py --passages 64 --batch-size 16 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python benchmarks/x.py` puts benchmarks/ first, not the repo root

RESULTS = ROOT / "benchmarks" / "results" / "local_llm_speed.json"
GOAL = 3.0


def passages(count: int) -> tuple[list[dict[str, Any]], str]:
    """The first `count` SciFact passages as ReadCorpus makes them (PASSAGE rows), else stdlib ones; their source."""
    from pipelines.stages.read_corpus import ReadCorpusConfig, truncate_to_tokens
    from tests.shared_data import find_shared_data

    max_tokens = ReadCorpusConfig().max_tokens
    shared = find_shared_data()
    corpus = shared / "scifact" / "corpus.jsonl" if shared else None
    records: list[dict[str, str]] = []
    if corpus is not None and corpus.exists():
        source = f"SciFact ({corpus})"
        with corpus.open(encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                records.append({"id": record["_id"], "title": record.get("title") or "", "text": record["text"]})
                if len(records) == count:
                    break
    else:
        from pipelines.stdlib_corpus import stdlib_records

        source = "builtin:python-stdlib (no shared SciFact data)"
        records = stdlib_records(count)
    rows = []
    for record in records:
        text, truncated = truncate_to_tokens(record["text"], max_tokens)
        rows.append({"passage_id": record["id"], "title": record.get("title") or "", "text": text,
                     "truncated": truncated})
    return rows, source


def answer_key(result: Any) -> tuple[Any, ...]:
    return result.raw, result.ok, result.usage.input_tokens, result.usage.output_tokens


def timed(run: Any) -> tuple[list[Any], float, float]:
    """(results, wall seconds, CPU seconds of this process) of one pass over every prompt."""
    wall, cpu = time.perf_counter(), time.process_time()
    results = run()
    return results, time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=32, help="passages, one query request each")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="answers generate_many writes at once (the pipeline passes generate.llm.concurrency, 8)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each path, alternating which goes first")
    parser.add_argument("--torch-threads", type=int, help="default: $EMBFORGE_TORCH_THREADS, else every CPU")
    args = parser.parse_args(argv)
    if args.passages < 1 or args.batch_size < 1 or args.repeats < 1:
        parser.error("--passages, --batch-size and --repeats must be >= 1")
    started = time.perf_counter()
    load_before = os.getloadavg()

    from pipelines.clients.batched_decoding import plan_prefix_tree
    from pipelines.clients.local_llm import LocalLLM
    from pipelines.stages.generate_queries import GenerateQueriesConfig, build_requests

    rows, source = passages(args.passages)
    queries = GenerateQueriesConfig()
    requests = [request for row in rows for request in build_requests(row, queries)]
    output_model, config = requests[0].output_model, requests[0].config
    messages = [request.messages for request in requests]

    llm = LocalLLM(torch_threads=args.torch_threads)
    prompts = [llm._encode(llm._render_prompt(request)) for request in messages]
    nodes, deepest = plan_prefix_tree(prompts)
    prompt_tokens = sum(len(prompt) for prompt in prompts)
    # What the new path runs of the prompts: each shared prefix once, then each prompt from its deepest prefix on.
    own = [len(prompt) - (nodes[node].end if node is not None else 0)
           for prompt, node in zip(prompts, deepest, strict=True)]
    run_tokens = sum(node.end - node.start for node in nodes) + sum(own)
    print(f"{len(requests)} query requests for {len(rows)} passages from {source}; LocalLLM {llm.model_id} "
          f"({llm.model_version}), {llm.torch_threads} torch threads, {os.cpu_count()} CPUs; greedy, "
          f"max_output_tokens {config.max_output_tokens}; batch size {args.batch_size}; load average before "
          f"{', '.join(f'{x:.2f}' for x in load_before)}")
    print(f"prompt tokens {prompt_tokens} (mean {prompt_tokens / len(prompts):.0f}); the new path runs {run_tokens} of "
          f"them ({run_tokens / prompt_tokens:.0%}: {len(nodes)} shared prefixes once, then each prompt's own part)",
          flush=True)

    paths = {
        "old": lambda: [llm.generate(request, output_model, config) for request in messages],
        "new": lambda: llm.generate_many(messages, output_model, config, concurrency=args.batch_size),
    }
    print(f"{'run':>3} {'path':<4} {'wall s':>8} {'queries/s':>9} {'CPU s':>8} {'differ':>6} {'load1':>6}")
    runs: list[dict[str, Any]] = []
    reference: list[Any] | None = None
    differing: dict[int, tuple[str, str]] = {}
    for repeat in range(args.repeats):
        for path in ("old", "new") if repeat % 2 == 0 else ("new", "old"):
            results, wall, cpu = timed(paths[path])
            reference = reference or results  # the first run is an old one
            differ = [index for index, (result, expected) in enumerate(zip(results, reference, strict=True))
                      if answer_key(result) != answer_key(expected)]
            for index in differ:
                differing.setdefault(index, (reference[index].raw, results[index].raw))
            run = {"repeat": repeat, "path": path, "wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
                   "queries_per_second": round(len(results) / wall, 4), "answers_differing": len(differ),
                   "answers_ok": sum(result.ok for result in results), "load1": round(os.getloadavg()[0], 2)}
            runs.append(run)
            print(f"{repeat:>3} {path:<4} {wall:>8.1f} {run['queries_per_second']:>9.3f} {cpu:>8.1f} {len(differ):>6} "
                  f"{run['load1']:>6.2f}", flush=True)

    mean = {path: statistics.mean(run["queries_per_second"] for run in runs if run["path"] == path) for path in paths}
    ratio = mean["new"] / mean["old"]
    for index, (old_raw, new_raw) in sorted(differing.items()):
        print(f"request {requests[index].request_id} differs:\n  old {old_raw}\n  new {new_raw}")
    assert reference is not None
    output_tokens = sum(result.usage.output_tokens for result in reference)
    print(f"output tokens {output_tokens} (mean {output_tokens / len(requests):.1f}); answers ok "
          f"{sum(result.ok for result in reference)} of {len(requests)}")
    print(f"queries/s: old {mean['old']:.3f}, new {mean['new']:.3f}; new / old {ratio:.2f}x; goal >= {GOAL:g}x: "
          f"{'met' if ratio >= GOAL else 'MISSED'}; answers differing from the first old run: {len(differing)} of "
          f"{len(requests)}; load average after {', '.join(f'{x:.2f}' for x in os.getloadavg())}")

    document = {
        "benchmark": "local_llm_speed",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "torch_threads": llm.torch_threads,
        "load_average_before": list(load_before),
        "load_average_at_end": list(os.getloadavg()),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "settings": {**vars(args), "corpus": source, "requests": len(requests), "model": llm.model_id,
                     "model_version": llm.model_version, "max_output_tokens": config.max_output_tokens,
                     "temperature": config.temperature},
        "prompt_tokens": prompt_tokens,
        "prompt_tokens_run_by_new_path": run_tokens,
        "shared_prefixes": len(nodes),
        "output_tokens": output_tokens,
        "queries_per_second": {path: round(value, 4) for path, value in mean.items()},
        "ratio_new_over_old": round(ratio, 3),
        "goal": GOAL,
        "goal_met": ratio >= GOAL,
        "requests_differing": [requests[index].request_id for index in sorted(differing)],
        "runs": runs,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(document, indent=1) + "\n")
    print(f"written {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
