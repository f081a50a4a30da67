"""How close `embforge generate --dry-run` comes to what the run then reports: estimate / actual per stage.

Issue #14 item 3: the token and cost estimate within +-30% of the real run's manifest, on the fake Gemini server. The
server (tests/fakes/gemini_server.py, in this process, on 127.0.0.1) counts tokens as Gemini roughly does (4
characters a token) and answers with answers the size a capable model writes (tests/fakes/sized_answers.py). The run:
the built-in stdlib corpus, Gemini LLM and teacher, LLM grading and LLM negative scoring on.

Three cases:
- **cold**: an empty cache, so output tokens come from the prompts' own examples;
- **cold, no LLM scoring**: the same without mining's LLM scoring, the one stage counted by its upper bound (its
  candidates come from the teacher's search, which a dry run does not make);
- **calibrated**: after a run on `--calibration` passages (a subset: samples are nested), the estimate for
  `--passages` reads output tokens from the cache's answers and counts only the new requests.

Writes benchmarks/results/dry_run_accuracy.json. No figure depends on time: it can run beside other work.

    python benchmarks/dry_run_accuracy.py --passages 64 --calibration 16
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python benchmarks/x.py` puts benchmarks/ first, not the repo root

RESULTS = ROOT / "benchmarks" / "results" / "dry_run_accuracy.json"
FIELDS = ("requests", "input_tokens", "output_tokens", "cost")


def config_for(folder: str, base_url: str, passages: int, llm_scoring: bool = True):
    from pipelines.clients.specs import EmbedderSpec, LLMSpec
    from pipelines.config import GenerateConfig
    from pipelines.stages.embed_teacher import EmbedTeacherConfig
    from pipelines.stages.grade_relevance import GradeRelevanceConfig
    from pipelines.stages.mine_negatives import MineNegativesConfig
    from pipelines.stages.read_corpus import ReadCorpusConfig

    fast = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 10.0}
    return GenerateConfig(
        output=f"{folder}/run-{passages}", cache_dir=f"{folder}/cache", corpus=ReadCorpusConfig(sample=passages),
        llm=LLMSpec(backend="gemini", base_url=base_url, **fast),
        teacher=EmbedderSpec(backend="gemini", base_url=base_url, **fast),
        embed=EmbedTeacherConfig(dimension=64), grading=GradeRelevanceConfig(use_llm=True, use_roundtrip=False),
        mining=MineNegativesConfig(k=16, num_negatives=3, llm_scoring=llm_scoring, llm_candidates=5))


def measure(config) -> dict:
    from pipelines.dry_run import compare_with_manifest, estimate, format_table
    from pipelines.run import generate

    estimated = estimate(config)
    print(format_table(estimated, config), flush=True)
    manifest = generate(config)
    return compare_with_manifest(estimated, manifest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=64)
    parser.add_argument("--calibration", type=int, default=16, help="passages of the calibrating first run")
    args = parser.parse_args()

    from tests.fakes.gemini_server import FakeGeminiServer
    from tests.fakes.sized_answers import gemini_like_tokens, sized_answer

    os.environ.pop("GOOGLE_API_KEY", None)
    os.environ["GEMINI_API_KEY"] = "dry-run-accuracy-dummy-key"
    started = time.time()
    cases = {}
    with FakeGeminiServer(generate=sized_answer, count_tokens=gemini_like_tokens) as server, \
            tempfile.TemporaryDirectory(prefix="dry_run_accuracy_") as folder:
        cases["cold"] = measure(config_for(f"{folder}/cold", server.base_url, args.passages))
        cases["cold, no LLM scoring"] = measure(config_for(f"{folder}/plain", server.base_url, args.passages,
                                                           llm_scoring=False))
        calibrated = config_for(f"{folder}/calibrated", server.base_url, args.passages)
        from pipelines.run import generate

        generate(replace(calibrated, corpus=replace(calibrated.corpus, sample=args.calibration),
                         output=f"{folder}/calibrated/run-{args.calibration}"))
        cases["calibrated"] = measure(calibrated)

    print("\nestimate / actual (1.000 = exact):")
    print(f"{'case':<22} {'stage':<18} " + " ".join(f"{name:>13}" for name in FIELDS))
    for case, stages in cases.items():
        for stage, ratios in stages.items():
            print(f"{case:<22} {stage:<18} " + " ".join(
                f"{ratios[name]:>13.3f}" if ratios[name] is not None else f"{'-':>13}" for name in FIELDS))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "dry_run_accuracy",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "load_average_at_end": os.getloadavg(), "wall_seconds": round(time.time() - started, 1),
        "settings": vars(args), "goal": "total input tokens and cost within +-30%",
        "estimate_over_actual": cases,
    }, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
