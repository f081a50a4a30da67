"""LLM stage concurrency: achieved calls/s of GenerateQueries against a fixed-latency fake Gemini, over the ideal, for
the code before requests were kept always in flight and the code now, side by side in one run.

Goals (issue #14 item 4), at 200 ms: achieved / ideal >= 0.9 at concurrency 32, and >= 0.8 at 128 (or what stops it on
this machine, and the figure with more worker processes).

The fake Gemini server (tests/fakes/gemini_server.py) runs in a process of its own on 127.0.0.1, answering every
request after `--latency` seconds. Each measurement runs the real GenerateQueries PTransform (PASSAGE rows from the
builtin stdlib corpus; `CallLLM` with the Gemini backend through google-genai; an empty cache dir) in a child process
with the options `embforge generate` uses, over `--calls-per-slot x concurrency` distinct passages (one call each):
- **before**: the code at `--baseline-rev` (default: the last commit before requests were kept in flight), checked out
  with `git worktree add --detach` into a temporary folder and put first on the child's PYTHONPATH;
- **after**: this working tree.
With `--workers W`, the largest concurrency also runs on Beam's multi_processing runner with W worker processes, each
keeping concurrency / W requests in flight (the same total): how a run scales out when one process's CPU is the limit.
The API key is a dummy set in the child's environment; nothing leaves the machine.

Columns:
- `server/s`: requests / (last answer - first arrival), measured by the server: the stage's sustained rate;
  `x ideal` divides it by concurrency / latency (every slot busy all the time).
- `e2e s`: the child's pipeline wall time (construction to the last row), Beam's start-up and the judging included.
- `in flight`: the most requests the server held at once.
- `cli ms`, `srv ms`: CPU time per call of the child (with its workers) and of the server process.

    python benchmarks/llm_concurrency.py                       # 200 ms; 8, 32, 128; before and after; 2 workers
    python benchmarks/llm_concurrency.py --latency 0.05 --concurrency 2 --calls-per-slot 2 --repeats 1   # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The code a child measures: this tree, or a baseline checkout (set by the parent in the child's environment).
CODE_ROOT_ENV = "EMBFORGE_BENCH_CODE_ROOT"
CODE_ROOT = Path(os.environ.get(CODE_ROOT_ENV, ROOT))
if str(CODE_ROOT) not in sys.path:
    sys.path.insert(0, str(CODE_ROOT))  # `python benchmarks/x.py` puts benchmarks/ first, not the repo root

#: The last commit before requests were kept in flight (batches of 8 x concurrency, each ending in a barrier).
BASELINE_REV = "9ca02c5"
DUMMY_KEY = "bench-llm-concurrency-dummy-key"
RESULTS = ROOT / "benchmarks" / "results" / "llm_concurrency.json"


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


def measure_stage(base_url: str, count: int, concurrency: int, workers: int) -> dict[str, float]:
    """In the child: GenerateQueries over `count` passages; its wall seconds and the rows it put out."""
    import apache_beam as beam

    from pipelines.clients.specs import LLMSpec
    from pipelines.config import BeamConfig, GenerateConfig
    from pipelines.model_access import ModelAccess
    from pipelines.run import pipeline_options
    from pipelines.stages.generate_queries import GenerateQueries, GenerateQueriesConfig

    rows = passages(count)
    spec = LLMSpec(backend="gemini", base_url=base_url, concurrency=concurrency, timeout_s=30.0)
    beam_config = (BeamConfig() if workers == 1
                   else BeamConfig(direct_running_mode="multi_processing", direct_num_workers=workers))
    with tempfile.TemporaryDirectory(prefix="bench_llm_") as folder:
        start = time.perf_counter()
        with beam.Pipeline(options=pipeline_options(GenerateConfig(beam=beam_config))) as pipeline:
            outputs = (pipeline | beam.Create(rows)
                       | GenerateQueries(GenerateQueriesConfig(), ModelAccess.llm(spec, f"{folder}/cache")))
            ((outputs["kept"], outputs["rejected"])
             | beam.Flatten()
             | beam.combiners.Count.Globally()
             | beam.Map(lambda n, path=f"{folder}/count": Path(path).write_text(str(n))))
        seconds = time.perf_counter() - start
        answered = int(Path(f"{folder}/count").read_text())
    return {"seconds": seconds, "answered": answered}


@contextlib.contextmanager
def baseline_checkout(revision: str):
    """The repository at `revision` in a temporary worktree, removed afterwards."""
    folder = tempfile.mkdtemp(prefix="embforge_baseline_")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", folder, revision], check=True,
                   capture_output=True)
    try:
        yield Path(folder)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", folder], check=False,
                       capture_output=True)


def run_child(code_root: Path, base_url: str, count: int, concurrency: int, workers: int) -> tuple[dict, float]:
    """One measurement in a child process running `code_root`'s pipeline code; its result and CPU seconds."""
    environment = {**os.environ, CODE_ROOT_ENV: str(code_root), "PYTHONPATH": str(code_root),
                   "GEMINI_API_KEY": DUMMY_KEY}
    environment.pop("GOOGLE_API_KEY", None)  # it would take precedence over the dummy key
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--measure", base_url, str(count), str(concurrency),
         str(workers)], env=environment, cwd=str(code_root), capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"measurement failed ({code_root}):\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads(done.stdout.strip().splitlines()[-1]), cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.2, help="server-side seconds per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--calls-per-slot", type=int, default=25,
                        help="calls per concurrency slot: ideal stage time = calls-per-slot x latency")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline-rev", default=BASELINE_REV, help="the 'before' code ('' skips it)")
    parser.add_argument("--workers", type=int, nargs="*", default=[2],
                        help="worker processes for the scale-out rows at the largest concurrency")
    parser.add_argument("--measure", nargs=4, metavar=("URL", "PASSAGES", "CONCURRENCY", "WORKERS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        url, count, concurrency, workers = args.measure
        print(json.dumps(measure_stage(url, int(count), int(concurrency), int(workers))))
        return

    from tests.fakes.gemini_server import ServerProcess

    started = time.time()
    print(f"latency {args.latency * 1000:.0f} ms, {args.calls_per_slot} calls per slot, GenerateQueries on the "
          f"in-process Beam runner; load average before {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    header = (f"{'code':<7} {'conc':>4} {'workers':>7} {'run':>3} {'calls':>6} {'ideal/s':>8} {'server/s':>9} "
              f"{'x ideal':>8} {'e2e s':>7} {'in flight':>9} {'cli ms':>7} {'srv ms':>7} {'load1':>6}")
    print(header)
    measurements = []
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(ServerProcess(latency_s=args.latency, cwd=str(ROOT)))
        codes = [("after", ROOT)]
        if args.baseline_rev:
            codes.insert(0, ("before", stack.enter_context(baseline_checkout(args.baseline_rev))))
        plan = [(concurrency, 1) for concurrency in args.concurrency]
        plan += [(max(args.concurrency), workers) for workers in args.workers if workers > 1]
        for concurrency, workers in plan:
            for label, code_root in codes:
                for repeat in range(args.repeats):
                    count = args.calls_per_slot * concurrency
                    server.reset()
                    server_cpu = server.stats()["cpu_seconds"]
                    result, client_cpu = run_child(code_root, server.base_url, count, concurrency // workers,
                                                   workers)
                    stats = server.stats()
                    calls = stats["by_method"].get("generateContent", 0)
                    if result["answered"] != count or calls != count:
                        raise SystemExit(f"{count} passages: {result['answered']} rows out, {calls} calls")
                    ideal = concurrency / args.latency
                    achieved = calls / (stats["last_answer"] - stats["first_arrival"])
                    row = {"code": label, "concurrency": concurrency, "workers": workers, "repeat": repeat,
                           "calls": calls, "ideal_calls_per_s": ideal, "achieved_calls_per_s": achieved,
                           "achieved_over_ideal": achieved / ideal, "e2e_seconds": result["seconds"],
                           "max_in_flight": stats["max_in_flight"],
                           "client_cpu_ms_per_call": 1000 * client_cpu / calls,
                           "server_cpu_ms_per_call": 1000 * (stats["cpu_seconds"] - server_cpu) / calls,
                           "load1": os.getloadavg()[0]}
                    measurements.append(row)
                    print(f"{label:<7} {concurrency:>4} {workers:>7} {repeat:>3} {calls:>6} {ideal:>8.1f} "
                          f"{achieved:>9.1f} {achieved / ideal:>8.3f} {result['seconds']:>7.2f} "
                          f"{stats['max_in_flight']:>9} {row['client_cpu_ms_per_call']:>7.1f} "
                          f"{row['server_cpu_ms_per_call']:>7.1f} {row['load1']:>6.2f}", flush=True)

    print("\nbest achieved / ideal of the repeats, before -> after:")
    summary = []
    for concurrency, workers in plan:
        best = {label: max(row["achieved_over_ideal"] for row in measurements
                           if (row["code"], row["concurrency"], row["workers"]) == (label, concurrency, workers))
                for label, _ in codes}
        summary.append({"concurrency": concurrency, "workers": workers, **best})
        line = " -> ".join(f"{label} {value:.3f}" for label, value in best.items())
        print(f"  concurrency {concurrency:>4}, {workers} process(es): {line}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "llm_concurrency",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "load_average_at_end": os.getloadavg(),
        "wall_seconds": round(time.time() - started, 1),
        "settings": {"latency_s": args.latency, "concurrency": args.concurrency,
                     "calls_per_slot": args.calls_per_slot, "repeats": args.repeats,
                     "baseline_rev": args.baseline_rev, "workers": args.workers},
        "goals": {"32": 0.9, "128": 0.8},
        "summary": summary,
        "measurements": measurements,
    }, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
