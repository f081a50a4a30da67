"""LLM stage concurrency: achieved calls/s of GenerateQueries against a fixed-latency fake Gemini, over the ideal.

Goal (issue #7): achieved / ideal >= 0.8, where ideal = concurrency / latency (every slot busy all the time).

The fake Gemini server (tests/fakes/gemini_server.py) runs in a process of its own on 127.0.0.1, answering every
request after `--latency` seconds. The real GenerateQueries PTransform (PASSAGE rows from the builtin stdlib corpus
in; `CallLLM` with the Gemini backend through google-genai; an empty cache dir) runs on the in-process Beam runner
with the options `embforge generate` uses, over `--calls-per-slot x concurrency` passages (one query each, so one
call each), at each `--concurrency`. The API key is a dummy set in this process's environment; nothing leaves the
machine.

Columns:
- `server calls/s`: requests / (last answer - first arrival), measured by the server: the stage's sustained rate.
- `e2e calls/s`: requests / pipeline wall time (construction to the last row), Beam's start-up and the per-passage
  judging included.
- `max in flight`: the most requests the server held at once.
- `client / server CPU ms/call`: CPU time of this process (Beam and google-genai) and of the server process per call.

`--what-if-batch K` adds rows where CallLLM's batches are fixed at K x concurrency instead of the 8 x concurrency of
pipelines/llm_calls.py (BatchElements patched for those rows only), to show what the batch size costs; the other rows
run the code as it is.

    python benchmarks/llm_concurrency.py --latency 0.2 --concurrency 1 8 32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python benchmarks/x.py` puts benchmarks/ first, not the repo root

DUMMY_KEY = "bench3-dummy-key"


def passages(count: int) -> list[dict[str, str]]:
    """`count` PASSAGE rows with distinct texts (distinct requests: no call is shared or cached)."""
    from pipelines.stdlib_corpus import stdlib_records

    records = stdlib_records(count)
    rows = [{"passage_id": record["id"], "text": record["text"], "title": record.get("title") or "",
             "source": "stdlib", "truncated": False} for record in records]
    for index in range(len(rows), count):  # more than the stdlib corpus holds: numbered variants
        base = records[index % len(records)]
        rows.append({"passage_id": f"{base['id']}#{index}", "text": f"{base['text']} ({index})",
                     "title": base.get("title") or "", "source": "stdlib", "truncated": False})
    return rows


def run_stage(base_url: str, rows: list[dict[str, str]], concurrency: int) -> tuple[float, int]:
    """Pipeline wall seconds and kept + rejected rows."""
    import apache_beam as beam

    from pipelines.clients.specs import LLMSpec
    from pipelines.config import GenerateConfig
    from pipelines.model_access import ModelAccess
    from pipelines.run import pipeline_options
    from pipelines.stages.generate_queries import GenerateQueries, GenerateQueriesConfig

    spec = LLMSpec(backend="gemini", base_url=base_url, concurrency=concurrency, timeout_s=30.0)
    with tempfile.TemporaryDirectory(prefix="bench3_llm_") as folder:
        start = time.perf_counter()
        with beam.Pipeline(options=pipeline_options(GenerateConfig())) as pipeline:
            outputs = (pipeline | beam.Create(rows)
                       | GenerateQueries(GenerateQueriesConfig(), ModelAccess.llm(spec, f"{folder}/cache")))
            ((outputs["kept"], outputs["rejected"])
             | beam.Flatten()
             | beam.combiners.Count.Globally()
             | beam.Map(lambda n: Path(f"{folder}/count").write_text(str(n))))
        seconds = time.perf_counter() - start
        answered = int(Path(f"{folder}/count").read_text())
    return seconds, answered


@contextlib.contextmanager
def fixed_batches(size: int | None):
    """While active, every `beam.BatchElements` (CallLLM's is the only one in this pipeline) batches exactly `size`."""
    import apache_beam as beam

    original = beam.BatchElements
    if size is not None:
        beam.BatchElements = lambda **_: original(min_batch_size=size, max_batch_size=size)
    try:
        yield
    finally:
        beam.BatchElements = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.2, help="server-side seconds per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--calls-per-slot", type=int, default=25,
                        help="calls per concurrency slot: ideal stage time = calls-per-slot x latency")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--what-if-batch", type=int, nargs="*", default=[],
                        help="also run with CallLLM batches fixed at K x concurrency, for each K given")
    args = parser.parse_args()

    from tests.fakes.gemini_server import ServerProcess

    # A dummy key for the loopback server; GOOGLE_API_KEY would take precedence, so it goes.
    os.environ.pop("GOOGLE_API_KEY", None)
    os.environ["GEMINI_API_KEY"] = DUMMY_KEY
    print(f"latency {args.latency * 1000:.0f} ms, {args.calls_per_slot} calls per slot, GenerateQueries on the "
          f"in-process Beam runner; load average before {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'conc':>4} {'batches':<10} {'run':>3} {'calls':>6} {'ideal/s':>8} {'server/s':>9} {'x ideal':>8} "
          f"{'e2e s':>7} {'e2e/s':>7} {'x ideal':>8} {'in flight':>9} {'cli ms':>7} {'srv ms':>7} {'load1':>6}")
    summary = []
    variants = [None, *args.what_if_batch]
    with ServerProcess(latency_s=args.latency, cwd=str(ROOT)) as server:
        for concurrency in args.concurrency:
            rows = passages(args.calls_per_slot * concurrency)
            ideal = concurrency / args.latency
            for multiple in variants:
                label = "as is" if multiple is None else f"fixed {multiple}xC"
                ratios = []
                for repeat in range(args.repeats):
                    server.reset()
                    server_cpu = server.stats()["cpu_seconds"]
                    client_cpu = time.process_time()
                    with fixed_batches(None if multiple is None else multiple * concurrency):
                        seconds, answered = run_stage(server.base_url, rows, concurrency)
                    client_cpu = time.process_time() - client_cpu
                    stats = server.stats()
                    calls = stats["by_method"].get("generateContent", 0)
                    if answered != len(rows) or calls != len(rows):
                        raise SystemExit(f"{len(rows)} passages: {answered} rows out, {calls} calls")
                    window = stats["last_answer"] - stats["first_arrival"]
                    ratio = calls / window / ideal
                    ratios.append(ratio)
                    print(f"{concurrency:>4} {label:<10} {repeat:>3} {calls:>6} {ideal:>8.1f} {calls / window:>9.1f} "
                          f"{ratio:>8.3f} {seconds:>7.2f} {calls / seconds:>7.1f} {calls / seconds / ideal:>8.3f} "
                          f"{stats['max_in_flight']:>9} {1000 * client_cpu / calls:>7.1f} "
                          f"{1000 * (stats['cpu_seconds'] - server_cpu) / calls:>7.1f} {os.getloadavg()[0]:>6.2f}",
                          flush=True)
                summary.append((concurrency, label, max(ratios), min(ratios)))
    for concurrency, label, best, worst in summary:
        print(f"concurrency {concurrency}, batches {label}: server-side achieved / ideal {worst:.3f}..{best:.3f}; "
              f"goal >= 0.8: {'met' if best >= 0.8 else 'MISSED'}")
    print(json.dumps({"load_average_after": os.getloadavg()}))


if __name__ == "__main__":
    main()
