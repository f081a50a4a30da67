"""embforge's trainer vs sentence-transformers' trainer with MultipleNegativesRankingLoss (issue #7 item 5).

Prints steady-state training examples (triplets) per second, side by side, with the ratio to sentence-transformers
(goal: embforge / ST >= 1.0). Both sides train the packaged all-MiniLM-L6-v2 on the same triplet shard (query,
positive, hard negatives) with the same batch size, max length, number of optimizer steps, learning-rate schedule,
weight decay, gradient clipping, seed and prompts, in fp32 on CPU with the same torch thread count. Each run is its own
subprocess, so neither inherits the other's warm caches or allocator state; runs alternate their order per repeat
because the machine may be shared.

Rows:
- `sentence-transformers`: `SentenceTransformerTrainer` + `MultipleNegativesRankingLoss` (scale 20 = 1 / 0.05),
  `NO_DUPLICATES` batch sampler, one (anchor, positive, negative_1..n) dataset.
- `embforge InfoNCE`: `embedder.train.train` configured as the closest equivalent of MNRL: InfoNCE with in-batch and
  hard negatives at temperature 0.05, full dimension only; Matryoshka, distillation and spread-out off.
- `embforge default losses`: the default loss set: InfoNCE at Matryoshka dims (384, 256, 128, 64), embedding-matching
  distillation to cached teacher vectors (768-d, like all-mpnet-base-v2, so the distillation head projects) and the
  spread-out regularizer: what the extras cost.

Timing: a step is everything from fetching its batch to the optimizer and schedule update, tokenization and logging
included: for ST the interval between consecutive `on_step_end` callbacks (its data loader tokenizes in the collator),
for embforge the interval between consecutive batch fetches of its sampler. Model loading, checkpoints and the final
save are outside both. The first `--warmup-steps` steps are reported apart (first-call allocation, thread-pool
start-up) and left out of the rates. Three rates per run, in examples per second after warm-up: wall clock (the
headline), the fastest single step, and examples per CPU-second of the trainer process (time.process_time): on a
shared machine other jobs stretch wall time far more than the CPU time a trainer itself spends.

Data: synthetic triplets with SciFact-like lengths (a 10-25 word claim, passages of 150-250 words, so passages fill
`--max-length` as most SciFact abstracts do at 128 tokens), every text distinct so no batch sampler has to hold an
example back. Teacher vectors are seeded random unit vectors: only their shape matters for speed.

    pip install -e '.[train-compare]'
    python benchmarks/trainer_vs_sentence_transformers.py --negatives 2 --steps 12 --warmup-steps 3 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STUDENT = "packaged:all-minilm-l6-v2"
#: MNRL's default scale 20 is a temperature of 0.05, embforge's default.
TEMPERATURE = 0.05
LEARNING_RATE = 2e-5
WARMUP_RATIO = 0.1
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0
#: all-mpnet-base-v2's dimension, the local teacher: distillation then needs its projection head, as in a real run.
TEACHER_DIM = 768
SEED = 42

#: Plain English words: the WordPiece tokenizer splits them into about 1.2 tokens each, like scientific prose.
WORDS = (
    "cell protein gene expression tumor patient risk increase decrease level mouse model receptor signal pathway "
    "response treatment therapy clinical trial cohort study effect associated reduced higher lower activity binding "
    "mutation variant function disease cancer immune infection virus bacteria blood brain heart liver kidney tissue "
    "growth factor inhibitor drug dose outcome mortality survival analysis data sample population age women men "
    "children adult human animal induced mediated regulation transcription membrane mitochondrial metabolic insulin "
    "glucose obesity diabetes inflammation antibody vaccine sequence structure molecular genetic cellular specific "
    "significant observed measured compared controlled randomized evidence suggests indicates demonstrated shown"
).split()

RUNNERS = ("st", "embforge_infonce", "embforge_default")
LABELS = {"st": "sentence-transformers MNRL", "embforge_infonce": "embforge InfoNCE",
          "embforge_default": "embforge default losses"}


# ---- data -----------------------------------------------------------------------------------------------------------


def make_triplet_rows(count: int, negatives: int, seed: int) -> list[dict]:
    """TRIPLET rows of synthetic text, every text distinct, with random unit teacher vectors."""
    rng = np.random.default_rng(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS, size=int(rng.integers(low, high + 1))))

    def unit(rows: int) -> list[list[float]]:
        vectors = rng.standard_normal((rows, TEACHER_DIM)).astype(np.float32)
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).tolist()

    rows = []
    for index in range(count):
        negative_texts = [text(150, 250) for _ in range(negatives)]
        rows.append({
            "triplet_id": f"t{index}", "task": "Given a scientific claim, retrieve documents that support it",
            "query_id": f"q{index}", "query": text(10, 25),
            "positive_id": f"p{index}", "positive": text(150, 250), "positive_relabeled": False,
            "negative_ids": [f"n{index}-{offset}" for offset in range(negatives)], "negatives": negative_texts,
            "positive_teacher_score": 0.8, "negative_teacher_scores": [0.5] * negatives, "negative_llm_scores": None,
            "query_embedding": unit(1)[0], "positive_embedding": unit(1)[0], "negative_embeddings": unit(negatives),
            "teacher_model": f"random-unit-{TEACHER_DIM}",
        })
    texts = [text for row in rows for text in (row["query"], row["positive"], *row["negatives"])]
    # Random draws of 10+ words from this vocabulary do not repeat in practice; a repeat would make the samplers
    # hold examples back and the batches differ in size between the trainers.
    assert len(set(texts)) == len(texts), "synthetic texts repeat: change the seed"
    return rows


def write_triplet_shard(data_dir: str, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_schemas import TRIPLET, validate_rows

    path = os.path.join(data_dir, "triplets", "part-00000-of-00001.parquet")
    validate_rows(rows, TRIPLET, source=path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=TRIPLET), path)


# ---- workers --------------------------------------------------------------------------------------------------------


class StepClock:
    """Wall and process CPU time at each step boundary."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def tick(self) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def steps(self) -> dict:
        return {"seconds": np.diff(self.wall).tolist(), "cpu_seconds": np.diff(self.cpu).tolist()}


def run_embforge(args: argparse.Namespace, output_dir: str, default_losses: bool) -> dict:
    from embedder.config import TrainConfig
    from embedder.data import TaskBatchSampler
    from embedder.train import train

    shared = dict(student=STUDENT, max_seq_length=args.max_length, batch_size=args.batch_size, max_steps=args.steps,
                  learning_rate=LEARNING_RATE, warmup_ratio=WARMUP_RATIO, lr_schedule="linear",
                  weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM, temperature=TEMPERATURE, precision="fp32",
                  device="cpu", num_threads=args.threads, seed=SEED, checkpoint_every=0, output_dir=output_dir,
                  progress=False)
    if default_losses:
        config = TrainConfig(**shared)
    else:
        config = TrainConfig(**shared, matryoshka_dims=(), distillation_weight=0.0, spread_out_weight=0.0)
    # A step begins when the trainer fetches its batch (grad_accumulation is 1): the interval between two fetches is
    # one whole step, logging included, the same span as between two of sentence-transformers' on_step_end calls.
    clock = StepClock()
    next_batch = TaskBatchSampler.next_batch

    def timed_next_batch(sampler: TaskBatchSampler):
        clock.tick()
        return next_batch(sampler)

    TaskBatchSampler.next_batch = timed_next_batch
    train(config, args.data)
    with open(os.path.join(output_dir, "losses.jsonl"), encoding="utf-8") as handle:
        history = [json.loads(line) for line in handle]
    # N fetches delimit the first N - 1 steps; the last step ends in checkpoint writing, which is not training.
    return {**clock.steps(), "examples": [line["examples"] for line in history[:-1]],
            "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"]}


def run_sentence_transformers(args: argparse.Namespace, output_dir: str) -> dict:
    import pyarrow.parquet as pq
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from transformers import TrainerCallback

    from embedder.config import DEFAULT_TASK_PROMPTS
    from pipelines.clients.base import TaskType
    from pipelines.clients.packaged_models import resolve_model

    table = pq.read_table(os.path.join(args.data, "triplets")).select(["query", "positive", "negatives"]).to_pylist()
    negatives = len(table[0]["negatives"])
    columns = {"anchor": [row["query"] for row in table], "positive": [row["positive"] for row in table]}
    columns.update({f"negative_{n + 1}": [row["negatives"][n] for row in table] for n in range(negatives)})
    dataset = Dataset.from_dict(columns)
    # The prompts embforge puts in front of queries and documents, so both sides tokenize the same texts.
    query_prompt = DEFAULT_TASK_PROMPTS[TaskType.RETRIEVAL_QUERY.value]
    document_prompt = DEFAULT_TASK_PROMPTS[TaskType.RETRIEVAL_DOCUMENT.value]
    prompts = {column: query_prompt if column == "anchor" else document_prompt for column in columns}

    model = SentenceTransformer(resolve_model(STUDENT).location, device="cpu")
    model.max_seq_length = args.max_length

    clock = StepClock()

    class StepEnds(TrainerCallback):
        def on_train_begin(self, *_, **__) -> None:
            clock.tick()

        def on_step_end(self, *_, **__) -> None:
            clock.tick()

    training_args = SentenceTransformerTrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=LEARNING_RATE, warmup_steps=WARMUP_RATIO, lr_scheduler_type="linear", weight_decay=WEIGHT_DECAY,
        max_grad_norm=MAX_GRAD_NORM, seed=SEED, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, dataloader_num_workers=0, batch_sampler=BatchSamplers.NO_DUPLICATES, prompts=prompts,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=training_args, train_dataset=dataset,
        loss=MultipleNegativesRankingLoss(model, scale=1 / TEMPERATURE), callbacks=[StepEnds()],
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    steps = clock.steps()
    return {**steps, "examples": [args.batch_size] * len(steps["seconds"]), "first_loss": losses[0],
            "last_loss": losses[-1]}


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="trainbench_run_") as output_dir:
        if args.worker == "st":
            result = run_sentence_transformers(args, output_dir)
        else:
            result = run_embforge(args, output_dir, default_losses=args.worker == "embforge_default")
    Path(args.output).write_text(json.dumps(result))


# ---- driver ---------------------------------------------------------------------------------------------------------


#: Per-run rates (see the module docstring): wall clock, fastest step, per CPU-second.
METRICS = ("wall", "best", "cpu")


def rates(result: dict, warmup_steps: int) -> dict[str, float]:
    examples = result["examples"][warmup_steps:]
    seconds = result["seconds"][warmup_steps:len(result["examples"])]
    cpu_seconds = result["cpu_seconds"][warmup_steps:len(result["examples"])]
    return {"wall": sum(examples) / sum(seconds),
            "best": max(count / step for count, step in zip(examples, seconds, strict=True)),
            "cpu": sum(examples) / sum(cpu_seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run, warm-up steps included")
    parser.add_argument("--warmup-steps", type=int, default=5, help="first steps left out of the rate")
    parser.add_argument("--negatives", type=int, default=3, help="hard negatives per triplet")
    parser.add_argument("--repeats", type=int, default=2, help="runs per trainer, in alternating order")
    parser.add_argument("--threads", type=int, default=min(2, len(os.sched_getaffinity(0))))
    parser.add_argument("--only", choices=RUNNERS, nargs="+", default=list(RUNNERS))
    parser.add_argument("--worker", choices=RUNNERS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.steps <= args.warmup_steps:
        parser.error(f"--steps {args.steps} must exceed --warmup-steps {args.warmup_steps}")

    print(f"batch {args.batch_size}, max length {args.max_length}, {args.negatives} hard negatives, {args.steps} steps "
          f"({args.warmup_steps} warm-up), {args.threads} torch threads, fp32 CPU, {args.repeats} repeats")
    print("ex/s: wall clock after warm-up; best: the fastest step; cpu: per CPU-second of the trainer process")
    measured: dict[str, list[dict[str, float]]] = {name: [] for name in args.only}
    with tempfile.TemporaryDirectory(prefix="trainbench_") as root:
        data_dir = os.path.join(root, "data")
        # One batch per step, so no run wraps into a second epoch.
        write_triplet_shard(data_dir, make_triplet_rows(args.batch_size * args.steps, args.negatives, SEED))
        print(f"{'repeat':>6} {'trainer':<27} {'ex/s':>6} {'best':>6} {'cpu':>6} {'warm-up s':>9} {'loss first':>10} "
              f"{'last':>6} {'loadavg before/after':>20}")
        for repeat in range(args.repeats):
            order = args.only if repeat % 2 == 0 else list(reversed(args.only))
            for name in order:
                load_before = os.getloadavg()[0]
                output = os.path.join(root, f"{name}-{repeat}.json")
                log = os.path.join(root, f"{name}-{repeat}.log")
                with open(log, "w", encoding="utf-8") as handle:
                    # The trainers' own logs and progress bars go to a file: the table stays readable.
                    finished = subprocess.run(
                        [sys.executable, __file__, "--worker", name, "--data", data_dir, "--output", output,
                         "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                         "--steps", str(args.steps), "--threads", str(args.threads)],
                        cwd=Path(__file__).resolve().parent.parent, stdout=handle, stderr=subprocess.STDOUT,
                    )
                if finished.returncode:
                    raise SystemExit(f"{LABELS[name]} failed (exit {finished.returncode}):\n"
                                     + Path(log).read_text()[-4000:])
                result = json.loads(Path(output).read_text())
                run = rates(result, args.warmup_steps)
                measured[name].append(run)
                load = f"{load_before:.2f}/{os.getloadavg()[0]:.2f}"
                print(f"{repeat:>6} {LABELS[name]:<27} {run['wall']:>6.2f} {run['best']:>6.2f} {run['cpu']:>6.2f} "
                      f"{sum(result['seconds'][:args.warmup_steps]):>9.1f} {result['first_loss']:>10.3f} "
                      f"{result['last_loss']:>6.3f} {load:>20}", flush=True)

    print("\nmedian over repeats, and the ratio to sentence-transformers (goal >= 1.0)")
    print(f"{'trainer':<27} {'ex/s':>6} {'best':>6} {'cpu':>6} {'x ST':>6} {'best x':>6} {'cpu x':>6}")
    medians = {name: {metric: statistics.median(run[metric] for run in runs) for metric in METRICS}
               for name, runs in measured.items()}
    reference = medians.get("st", dict.fromkeys(METRICS, float("nan")))
    for name, values in medians.items():
        print(f"{LABELS[name]:<27} " + " ".join(f"{values[metric]:>6.2f}" for metric in METRICS) + " "
              + " ".join(f"{values[metric] / reference[metric]:>6.2f}" for metric in METRICS))


if __name__ == "__main__":
    main()
