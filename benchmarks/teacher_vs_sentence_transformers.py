"""EmbedTeacher on Beam vs raw `SentenceTransformer.encode`: same texts, same model, same batch size (issue #7).

Goal: the pipeline adds little, i.e. stage throughput / sentence-transformers throughput >= 0.9.

Both sides load the packaged all-MiniLM-L6-v2 (`packaged:all-minilm-l6-v2`; `--model packaged:all-mpnet-base-v2` for
the default local teacher, ~5x slower on CPU) and encode with the same torch thread count and encode batch size
(`--batch-size`, the `EmbedderSpec.batch_size` the stage passes to `encode`). Texts are SciFact corpus passages
(`title + " " + text`, the first `--texts` of $EMBFORGE_SHARED_DATA/scifact or ../shared/data/scifact) when present,
else the builtin stdlib corpus. Each measurement runs in its own subprocess; `--repeats` alternates the two sides so
a neighbour's load spike hits both alike.

Rows:
- `sentence-transformers`: model load + one `encode(texts, batch_size=B)` call, the baseline (encode-only also shown).
- `EmbedTeacher (Beam)`: the EmbedTeacher PTransform on the in-process runner, as `embforge generate` runs it (same
  runner options), with an empty cache so every text is embedded; from pipeline construction to the last row, model
  load in `setup()` and cache writes included.
- `CPU s`: user + system CPU seconds of the measuring process (all threads), a second view that a busy machine
  distorts less than wall time; `x ST CPU` is sentence-transformers' CPU over the stage's.

    python benchmarks/teacher_vs_sentence_transformers.py --texts 1000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python benchmarks/x.py` puts benchmarks/ first, not the repo root

MODEL = "packaged:all-minilm-l6-v2"


def load_texts(count: int) -> tuple[list[str], str]:
    """The first `count` SciFact passages (title + text), else stdlib passages; (texts, where they came from)."""
    from tests.shared_data import find_shared_data

    shared = find_shared_data()
    corpus = shared / "scifact" / "corpus.jsonl" if shared else None
    if corpus is not None and corpus.exists():
        texts = []
        with corpus.open() as handle:
            for line in handle:
                row = json.loads(line)
                texts.append(f"{row.get('title', '')} {row['text']}".strip())
                if len(texts) == count:
                    break
        return texts, f"SciFact corpus ({corpus})"
    from pipelines.stdlib_corpus import stdlib_records

    return [record["text"] for record in stdlib_records(count)], "builtin stdlib corpus"


def run_sentence_transformers(texts: list[str], model: str, batch_size: int) -> dict[str, float]:
    import torch
    from sentence_transformers import SentenceTransformer

    from pipelines.clients.packaged_models import cap_torch_threads, resolve_model

    start = time.perf_counter()
    threads = cap_torch_threads(None)  # the thread count LocalEmbedder would use
    resolved = resolve_model(model, None)
    encoder = SentenceTransformer(resolved.location, device="cpu", local_files_only=resolved.is_local)
    loaded = time.perf_counter()
    with torch.inference_mode():
        vectors = encoder.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
    done = time.perf_counter()
    assert len(vectors) == len(texts)
    return {"seconds": done - start, "encode_seconds": done - loaded, "torch_threads": threads}


def run_beam(texts: list[str], model: str, batch_size: int, stage_batch: int) -> dict[str, float]:
    import apache_beam as beam
    import sentence_transformers  # noqa: F401 - imported before the clock starts, as on the other side
    import torch  # noqa: F401

    from pipelines.clients.base import TaskType
    from pipelines.clients.specs import EmbedderSpec
    from pipelines.config import GenerateConfig
    from pipelines.model_access import ModelAccess
    from pipelines.run import pipeline_options
    from pipelines.stages.embed_teacher import EmbedTeacher, EmbedTeacherConfig

    spec = EmbedderSpec(backend="local", model=model, batch_size=batch_size)
    document = TaskType.RETRIEVAL_DOCUMENT.value
    items = [{"id": str(i), "text": text, "task_type": document} for i, text in enumerate(texts)]
    with tempfile.TemporaryDirectory(prefix="bench3_teacher_") as folder:
        start = time.perf_counter()
        with beam.Pipeline(options=pipeline_options(GenerateConfig())) as pipeline:
            embedded = (pipeline | beam.Create(items)
                        | EmbedTeacher(ModelAccess.embedder(spec, f"{folder}/cache"),
                                       EmbedTeacherConfig(batch_size=stage_batch)))
            (embedded["kept"]
             | beam.combiners.Count.Globally()
             | beam.Map(lambda n: Path(f"{folder}/count").write_text(str(n))))
        seconds = time.perf_counter() - start
        kept = int(Path(f"{folder}/count").read_text())
    if kept != len(texts):
        raise SystemExit(f"EmbedTeacher kept {kept} of {len(texts)} texts")
    return {"seconds": seconds}


def cpu_seconds() -> float:
    """User + system CPU of this process, every thread: less sensitive than wall time to neighbours' load."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(name: str, args: argparse.Namespace) -> None:
    texts, _ = load_texts(args.texts)
    before = cpu_seconds()
    if name == "st":
        result = run_sentence_transformers(texts, args.model, args.batch_size)
    else:
        result = run_beam(texts, args.model, args.batch_size, args.stage_batch)
    # Includes the imports each side does before its clock starts (the same set: torch, sentence-transformers).
    result["cpu_seconds"] = cpu_seconds() - before
    Path(args.output).write_text(json.dumps(result))


def measure(name: str, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.NamedTemporaryFile(prefix="bench3_teacher_", suffix=".json") as output:
        subprocess.run(
            [sys.executable, __file__, "--worker", name, "--texts", str(args.texts), "--model", args.model,
             "--batch-size", str(args.batch_size), "--stage-batch", str(args.stage_batch), "--output", output.name],
            check=True, cwd=ROOT,
        )
        result = json.loads(Path(output.name).read_text())
    result["load"] = os.getloadavg()[0]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--model", default=MODEL, help="packaged:<name>, Hub id or folder; the same on both sides")
    parser.add_argument("--batch-size", type=int, default=32, help="encode batch size (EmbedderSpec.batch_size)")
    parser.add_argument("--stage-batch", type=int, default=64,
                        help="texts per backend call in the stage (EmbedTeacherConfig.batch_size, the default 64)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", choices=["st", "beam"], help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args)
        return

    texts, source = load_texts(args.texts)
    characters = sum(len(text) for text in texts)
    print(f"{len(texts)} texts from {source}, mean {characters / len(texts):.0f} characters; model {args.model}; "
          f"encode batch {args.batch_size}, stage batch {args.stage_batch}; load average before "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    runs: dict[str, list[dict[str, float]]] = {"st": [], "beam": []}
    for repeat in range(args.repeats):
        # Alternate the order so drift in the machine's load does not favour one side.
        for name in ("st", "beam") if repeat % 2 == 0 else ("beam", "st"):
            runs[name].append(measure(name, args))
    print(f"{'run':>3} {'tool':<24} {'wall s':>8} {'encode s':>9} {'texts/s':>8} {'x ST':>6} {'x ST enc':>8} "
          f"{'CPU s':>7} {'x ST CPU':>8} {'load1':>6}")
    for repeat in range(args.repeats):
        st, beam_run = runs["st"][repeat], runs["beam"][repeat]
        n = len(texts)
        print(f"{repeat:>3} {'sentence-transformers':<24} {st['seconds']:>8.1f} {st['encode_seconds']:>9.1f} "
              f"{n / st['seconds']:>8.1f} {1:>6.2f} {st['seconds'] / st['encode_seconds']:>8.2f} "
              f"{st['cpu_seconds']:>7.1f} {1:>8.2f} {st['load']:>6.2f}")
        print(f"{repeat:>3} {'EmbedTeacher (Beam)':<24} {beam_run['seconds']:>8.1f} {'':>9} "
              f"{n / beam_run['seconds']:>8.1f} {st['seconds'] / beam_run['seconds']:>6.2f} "
              f"{st['encode_seconds'] / beam_run['seconds']:>8.2f} {beam_run['cpu_seconds']:>7.1f} "
              f"{st['cpu_seconds'] / beam_run['cpu_seconds']:>8.2f} {beam_run['load']:>6.2f}")
    ratios = [st["seconds"] / b["seconds"] for st, b in zip(runs["st"], runs["beam"], strict=True)]
    encode_ratios = [st["encode_seconds"] / b["seconds"] for st, b in zip(runs["st"], runs["beam"], strict=True)]
    cpu_ratios = [st["cpu_seconds"] / b["cpu_seconds"] for st, b in zip(runs["st"], runs["beam"], strict=True)]
    median = statistics.median(ratios)
    print(f"throughput ratio EmbedTeacher / sentence-transformers (load + encode): median {median:.3f} "
          f"(runs: {', '.join(f'{r:.3f}' for r in ratios)}); vs encode only: median "
          f"{statistics.median(encode_ratios):.3f}; CPU-time ratio median {statistics.median(cpu_ratios):.3f}; "
          f"goal >= 0.9: {'met' if median >= 0.9 else 'MISSED'}; "
          f"torch threads {runs['st'][0]['torch_threads']}; load average after "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
