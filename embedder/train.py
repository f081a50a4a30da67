"""Train the student on a run's shards: `train(config, data_dir) -> path of the saved model`.

One flat loop, nanoGPT style:
  1. read and validate the shards, build the sampler of full single-task batches
  2. build the student (or load a checkpoint), the distillation head, AdamW and the warmup + decay schedule
  3. per optimizer step: `grad_accumulation` micro-batches, each its own contrastive batch, in which a passage that
     recurs is masked out of the softmax of the queries it is not a negative for; losses per term
  4. log every step to losses.jsonl (losses, examples, negatives per query, masked candidates), checkpoint every
     `checkpoint_every` steps and at the end
  5. save the final student as a sentence-transformers directory, plot the loss curves

Output directory:
    model/                      the trained student (sentence-transformers format; the return value); with `qat` its
                                weights are the fake-quantized values (float32 on the quantization grid)
    checkpoints/step-0000500/   model/, trainer_state.pt (optimizer, schedule, sampler, RNG states, step, the latent
                                float weights under QAT), losses.jsonl
    losses.jsonl, losses.png    one line per optimizer step: total and each loss term, examples, and for steps with
                                triplet batches the mean negatives per query and the masked candidates
    train_config.json, train_summary.json   (the summary: steps, mean batch size, mean negatives per query, masked
                                candidates, data counts)
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

from embedder.config import TrainConfig
from embedder.data import Batch, ClassificationExample, TaskBatchSampler, TrainingData, TripletExample, read_run
from embedder.losses import (
    EmbeddingMatching,
    global_orthogonal_regularization,
    in_batch_negative_mask,
    info_nce,
    label_classification,
    margin_mse,
    matryoshka,
    passage_groups,
)
from embedder.model import StudentEncoder
from embedder.qat import apply_fake_quantization, baked_weights, latent_weights, load_latent_weights
from pipelines.clients.base import TaskType
from pipelines.clients.packaged_models import cap_torch_threads, resolve_model, unavailable_error
from pipelines.outputs import replace_folder

logger = logging.getLogger(__name__)

DOCUMENT = TaskType.RETRIEVAL_DOCUMENT.value
CHECKPOINT_PREFIX = "step-"
#: Fields that may change between a checkpoint and its resumption without changing what is computed.
RESUMABLE_CHANGES = {"output_dir", "checkpoint_every", "keep_checkpoints", "progress", "num_threads", "device"}


# ---- setup helpers --------------------------------------------------------------------------------------------------


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision 'fp16' needs a CUDA device, got {device}; use 'bf16' or 'fp32'")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Learning-rate factor for optimizer update number `step` + 1: linear warmup to 1, then decay towards 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    # Counts this update, so the peak rate is used once (at the end of warmup) and the last update is not at 0.
    progress = (step - warmup_steps + 1) / (total_steps - warmup_steps + 1)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def load_student(config: TrainConfig) -> StudentEncoder:
    """The starting student: `packaged:` names resolve to the installed weight package (its Hub id when missing)."""
    resolved = resolve_model(config.student)
    try:
        return StudentEncoder.from_pretrained(resolved.location, max_seq_length=config.max_seq_length,
                                              prompts=config.task_prompts, projection_dim=config.projection_dim,
                                              default_prompt_name=config.default_prompt_name)
    except OSError as error:
        # Offline with a missing package or an unknown Hub id: say what to install or pass instead.
        raise unavailable_error(resolved, error) from error


def total_optimizer_steps(config: TrainConfig, sampler: TaskBatchSampler) -> int:
    if config.max_steps is not None:
        return config.max_steps
    batches = sum(len(sampler.epoch_batches(epoch)) for epoch in range(config.epochs))
    return math.ceil(batches / config.grad_accumulation)


def checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints of a run, oldest first."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    # Digits only: a `.partial` folder is a save that never finished.
    names = sorted(name for name in os.listdir(root)
                   if name.startswith(CHECKPOINT_PREFIX) and name.removeprefix(CHECKPOINT_PREFIX).isdigit()
                   and os.path.isfile(os.path.join(root, name, "trainer_state.pt")))
    return [os.path.join(root, name) for name in names]


def find_checkpoint(config: TrainConfig, resume: bool | str) -> tuple[str, str | None]:
    """(the folder this run works in, the checkpoint it starts from or None).

    A new run works in a staging folder beside `output_dir` and replaces `output_dir` only when it has finished, so an
    earlier student survives a run that fails. `resume=True` continues the run a kill interrupted (its checkpoints are
    in the staging folder), else the finished run in `output_dir` in place, else starts afresh; a path resumes from that
    checkpoint (or that run's latest).
    """
    staging = staging_directory(config.output_dir)
    if resume is True:
        interrupted = checkpoints(staging)
        if interrupted:
            return staging, interrupted[-1]
        finished = checkpoints(config.output_dir)
        if finished:
            return config.output_dir, finished[-1]
        checkpoint = None
    elif resume is False:
        checkpoint = None
    elif os.path.isfile(os.path.join(resume, "trainer_state.pt")):
        checkpoint = resume
    else:
        existing = checkpoints(resume)
        if not existing:
            raise FileNotFoundError(f"{resume}: neither a checkpoint (no trainer_state.pt) nor a run with checkpoints")
        checkpoint = existing[-1]
    if checkpoint is None or not os.path.abspath(checkpoint).startswith(os.path.abspath(staging) + os.sep):
        # What a staging folder holds is a run that never finished, and it is not the one being continued.
        shutil.rmtree(staging, ignore_errors=True)
    return staging, checkpoint


def staging_directory(output_dir: str) -> str:
    """Where a new run works until it has finished: `runs/x/student` -> `runs/x/.student.staging`."""
    parent, name = os.path.split(os.path.normpath(output_dir))
    return os.path.join(parent, f".{name}.staging")


def parameter_groups(encoder: nn.Module, heads: list[nn.Module], config: TrainConfig) -> list[dict]:
    """The pretrained encoder at `learning_rate`, new linear layers at `head_learning_rate`; weight decay on matrices
    only: decaying biases and LayerNorm gains only shrinks them towards 0 for no gain."""
    groups = []
    for modules, learning_rate in (([encoder], config.learning_rate), (heads, config.head_learning_rate)):
        decay, no_decay = [], []
        for module in modules:
            for parameter in module.parameters():
                if parameter.requires_grad:
                    (decay if parameter.ndim >= 2 else no_decay).append(parameter)
        groups += [{"params": decay, "weight_decay": config.weight_decay, "lr": learning_rate},
                   {"params": no_decay, "weight_decay": 0.0, "lr": learning_rate}]
    return [group for group in groups if group["params"]]


def adamw(groups: list[dict], learning_rate: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel where this torch has one for the parameters' device (CPU since torch 2.4).

    The default implementation on CPU loops in Python over every tensor with a dozen small ops each: measured here, it
    took 0.3-1.6 s per update of MiniLM's 22.7M weights on 2 busy cores, a large share of a training step; fused ~30 ms.
    sentence-transformers' trainer (transformers' default `adamw_torch_fused`) uses the fused kernel too.
    """
    try:
        return torch.optim.AdamW(groups, lr=learning_rate, fused=True)
    except RuntimeError:
        # Older torch, or a device without the fused kernel: the per-tensor loop computes the same update.
        return torch.optim.AdamW(groups, lr=learning_rate)


# ---- one batch -------------------------------------------------------------------------------------------------------


def batch_losses(embed: Callable[[list[str], str], torch.Tensor], head: EmbeddingMatching | None, batch: Batch,
                 data: TrainingData, examples: list[TripletExample | ClassificationExample], config: TrainConfig,
                 dims: tuple[int, ...], stats: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Every enabled loss term of one single-task batch, unweighted; `dims` are the Matryoshka dims (or empty).

    `embed(texts, task_type)` runs the student (under autocast on GPU) and returns fp32 unit vectors; the losses
    themselves run in fp32. `stats`, when given, gets the counts of a triplet batch added: "queries", "negatives"
    (candidates each query is scored against besides its positive, after masking, summed over queries),
    "masked_false_negatives" and "masked_repeats" (see `in_batch_negative_mask`).
    """
    kind, task = batch.task
    rows = [examples[index] for index in batch.indices]
    terms: dict[str, torch.Tensor] = {}
    if kind == "triplet":
        # A triplet batch's task is its query task type (see TaskBatchSampler).
        queries = embed([row.query for row in rows], task)
        # A passage that recurs in the batch is encoded once: fewer forward passes, and its copies are one vector.
        texts = [row.positive for row in rows] + [text for row in rows for text in row.negatives]
        unique = list(dict.fromkeys(texts))
        position = {text: index for index, text in enumerate(unique)}
        documents = embed(unique, DOCUMENT)[torch.tensor([position[text] for text in texts], device=queries.device)]
        positives, negatives = documents[:len(rows)], documents[len(rows):]
        positive_keys = [(row.positive_id, row.positive) for row in rows]
        mask = in_batch_negative_mask(
            positive_keys,
            [(negative_id, text) for row in rows
             for negative_id, text in zip(row.negative_ids or ("",) * len(row.negatives), row.negatives, strict=True)],
            device=queries.device)
        if stats is not None:
            stats["queries"] += len(rows)
            stats["negatives"] += int((~mask.masked).sum()) - len(rows)
            stats["masked_false_negatives"] += mask.false_negatives
            stats["masked_repeats"] += mask.repeats
        if config.infonce_weight > 0:
            terms["infonce"], per_dim = matryoshka(info_nce, dims, queries, positives, negatives,
                                                   temperature=config.temperature, mask=mask.masked)
            if len(per_dim) > 1:
                terms.update({f"infonce@{dim}": value.detach() for dim, value in per_dim.items()})
        if any(row.has_teacher for row in rows) and (head is not None or config.margin_distillation_weight > 0):
            teacher_rows, owners, negative_rows, offset = [], [], [], 0
            for index, row in enumerate(rows):
                count = len(row.negatives)
                if row.has_teacher:
                    owners += [len(teacher_rows)] * count
                    negative_rows += range(offset, offset + count)
                    teacher_rows.append(index)
                offset += count
            teacher = [rows[index] for index in teacher_rows]
            teacher_queries, teacher_positives, teacher_negatives = (
                torch.from_numpy(np.concatenate(vectors)).to(queries.device) for vectors in (
                    [row.query_embedding[None] for row in teacher], [row.positive_embedding[None] for row in teacher],
                    [row.negative_embeddings for row in teacher]))
            student_queries, student_positives = queries[teacher_rows], positives[teacher_rows]
            student_negatives = negatives[negative_rows]
            if head is not None:
                terms["distillation"] = head(torch.cat([student_queries, student_positives, student_negatives]),
                                             torch.cat([teacher_queries, teacher_positives, teacher_negatives]))
            if config.margin_distillation_weight > 0 and owners:
                terms["margin_distillation"], per_dim = matryoshka(
                    margin_mse, dims, student_queries, student_positives, student_negatives,
                    owners=torch.tensor(owners, device=queries.device), teacher_queries=teacher_queries,
                    teacher_positives=teacher_positives, teacher_negatives=teacher_negatives)
                if len(per_dim) > 1:
                    terms.update({f"margin_distillation@{dim}": value.detach() for dim, value in per_dim.items()})
        if config.spread_out_weight > 0:
            # Queries and positives separately, as EmbeddingGemma does: each column is one kind of text. One row per
            # distinct query text and per distinct positive passage: a repeat is a matching pair, not a spread one.
            # (A group's number is its first row.)
            distinct_queries = sorted(set(passage_groups([("", row.query) for row in rows])))
            distinct_positives = sorted(set(passage_groups(positive_keys)))
            terms["spread_out"] = (global_orthogonal_regularization(queries[distinct_queries])
                                   + global_orthogonal_regularization(positives[distinct_positives]))
    elif config.classification_weight > 0:
        # Repeated texts are harmless here: the candidates are the task's labels, and a repeat has the same target.
        labels = sorted({row.label for row in rows} | {label for row in rows for label in row.negative_labels})
        texts = embed([row.text for row in rows], config.query_task_type(task, classification=True))
        label_embeddings = embed([data.label_text(task, label) for label in labels], DOCUMENT)
        targets = torch.tensor([labels.index(row.label) for row in rows], device=texts.device)
        terms["classification"], per_dim = matryoshka(label_classification, dims, texts, label_embeddings,
                                                      targets=targets, temperature=config.temperature)
        if len(per_dim) > 1:
            terms.update({f"classification@{dim}": value.detach() for dim, value in per_dim.items()})
    return terms


# ---- checkpoints and logs --------------------------------------------------------------------------------------------


def rng_states() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


def write_losses(path: str, history: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for line in history:
            handle.write(json.dumps(line) + "\n")


def read_losses(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_losses(history: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({key for line in history for key in line if key == "loss" or key in LOSS_TERMS})
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for name in names:
        steps = np.array([line["step"] for line in history if name in line])
        values = np.array([line[name] for line in history if name in line])
        # Per-step losses of single-task batches are noisy: past 50 points, draw them faint under a moving average
        # over 1/50 of the run.
        window = len(values) // 50
        if window > 1:
            line, = axis.plot(steps, values, alpha=0.2, linewidth=0.5)
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            axis.plot(steps[window - 1:], smooth, color=line.get_color(), label=f"{name} (mean of {window})",
                      linewidth=2 if name == "loss" else 1)
        else:
            axis.plot(steps, values, label=name, linewidth=2 if name == "loss" else 1)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.set_title("training losses (total = weighted sum of the terms)")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


LOSS_TERMS = ("infonce", "distillation", "margin_distillation", "spread_out", "classification")


def batch_summary(history: list[dict], config: TrainConfig) -> dict[str, float | int | None]:
    """What the batches held over the run, from the per-step log lines (so a resumed run counts its earlier steps).

    mean_batch_size: examples per contrastive batch (micro-batch); with full batches it is `batch_size` but for the
    last batch of each task in an epoch. mean_negatives_per_query: over the steps with triplet batches, the mean
    number of candidates a query was scored against besides its positive (the batch's other positives and every hard
    negative), after masking. masked_*: candidates masked over the run (see `in_batch_negative_mask`).
    """
    triplet_steps = [line for line in history if "negatives_per_query" in line]
    return {
        "mean_batch_size": (sum(line["examples"] for line in history) / (len(history) * config.grad_accumulation)
                            if history else None),
        "mean_examples_per_step": sum(line["examples"] for line in history) / len(history) if history else None,
        "mean_negatives_per_query": (sum(line["negatives_per_query"] for line in triplet_steps) / len(triplet_steps)
                                     if triplet_steps else None),
        "masked_false_negatives": sum(line["masked_false_negatives"] for line in triplet_steps),
        "masked_repeats": sum(line["masked_repeats"] for line in triplet_steps),
    }


def save_checkpoint(output_dir: str, step: int, model: StudentEncoder, trainer_state: dict, history: list[dict],
                    keep: int) -> str:
    """Write into a temporary directory, then rename: a crash mid-save never leaves a checkpoint that looks whole."""
    root = os.path.join(output_dir, "checkpoints")
    final = os.path.join(root, f"{CHECKPOINT_PREFIX}{step:07d}")
    partial = final + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    model.save(os.path.join(partial, "model"))
    torch.save(trainer_state, os.path.join(partial, "trainer_state.pt"))
    write_losses(os.path.join(partial, "losses.jsonl"), history)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    if keep:
        for old in checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    return final


# ---- the loop ------------------------------------------------------------------------------------------------------


def train(config: TrainConfig, data_dir: str, resume: bool | str = False) -> str:
    """Train a student on the shards under `data_dir`; returns the saved model directory (`output_dir/model`).

    A new run (the default) trains from the start and replaces what `config.output_dir` held only once it has finished.
    `resume=True` continues the latest interrupted run (from scratch if there is none); a path resumes from that
    checkpoint (or that run's latest); see `find_checkpoint`. Resumption is exact: same batches, same dropout masks,
    same weights as a run that was never interrupted.
    """
    config.validate()
    device = pick_device(config.device)
    # Never more threads than cores we may run on: oversubscription slows every thread down.
    cap_torch_threads(min(config.num_threads, available_cores()) if config.num_threads else None)
    amp_dtype = autocast_dtype(config.precision, device)

    # 1. data
    data = read_run(data_dir)
    # Examples no enabled loss reads would only make empty steps.
    if config.classification_weight == 0 and data.classification:
        data.counts["classification_unused_weight_0"] += len(data.classification)
        data.classification = []
    if not (config.infonce_weight or config.distillation_weight or config.spread_out_weight
            or config.margin_distillation_weight or config.qat_self_distillation_weight) and data.triplets:
        data.counts["triplets_unused_weight_0"] += len(data.triplets)
        data.triplets = []
    if not data.examples:
        raise ValueError(f"{data_dir}: no example is read by an enabled loss (classification_weight="
                         f"{config.classification_weight}, triplet loss weights all 0?)")
    for name in ("distillation_weight", "margin_distillation_weight"):
        if getattr(config, name) > 0 and data.triplets and data.teacher_dim is None:
            logger.warning("%s=%s but no triplet row has teacher embeddings: that loss is off", name,
                           getattr(config, name))
    examples = data.examples
    sampler = TaskBatchSampler.for_data(
        data, config.batch_size, config.seed, lambda task: config.query_task_type(task, classification=False))
    total_steps = total_optimizer_steps(config, sampler)
    warmup_steps = round(config.warmup_ratio * total_steps)

    # 2. model, heads, optimizer
    work_dir, checkpoint = find_checkpoint(config, resume)
    state = None
    if checkpoint is not None:
        state = torch.load(os.path.join(checkpoint, "trainer_state.pt"), map_location="cpu", weights_only=False)
        changed = sorted(key for key, value in state["config"].items()
                         if key not in RESUMABLE_CHANGES and config.to_dict().get(key) != value)
        if changed:
            raise ValueError(f"{checkpoint} was trained with other settings ({', '.join(changed)}): resuming would not "
                             "reproduce that run; start a new output_dir instead")
    torch.manual_seed(config.seed)
    # The float model QAT self-distils onto is the starting student, also on resume: loaded right after the seed, so
    # that a fresh projection layer is initialized the same both times.
    reference = load_student(config) if config.qat and config.qat_self_distillation_weight > 0 else None
    if checkpoint is not None:
        model = StudentEncoder.load(os.path.join(checkpoint, "model"))
    elif reference is not None:
        model = copy.deepcopy(reference)
    else:
        model = load_student(config)
    if reference is not None:
        reference.requires_grad_(False)
        reference.to(device).eval()
    if config.qat:
        # Before the optimizer is built: it must hold the latent weights behind the fake quantization.
        try:
            apply_fake_quantization(model.transformer, config.qat)
        except ValueError as error:
            raise ValueError(f"qat: {config.student}: {error}") from error
    dims = tuple(config.matryoshka_dims)
    if dims and dims[0] > model.dimension:
        raise ValueError(f"matryoshka_dims {dims} start above the student's dimension {model.dimension} "
                         f"({config.student}); use dims <= {model.dimension} or set projection_dim")
    head = None
    if config.distillation_weight > 0 and data.teacher_dim is not None:
        head = EmbeddingMatching(model.dimension, data.teacher_dim)
    model.to(device).train()
    if head is not None:
        head.to(device)
    heads = [module for module in (model.projection, head) if module is not None]
    optimizer = adamw(parameter_groups(model.transformer, heads, config), config.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, warmup_steps, config.lr_schedule))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    weights = {"infonce": config.infonce_weight, "distillation": config.distillation_weight,
               "margin_distillation": config.margin_distillation_weight,
               "spread_out": config.spread_out_weight, "classification": config.classification_weight,
               "qat_self_distillation": config.qat_self_distillation_weight}

    step, history, elapsed = 0, [], 0.0
    os.makedirs(work_dir, exist_ok=True)
    if state is not None:
        if head is not None:
            head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        sampler.load_state_dict(state["sampler"])
        step, elapsed = state["step"], state.get("elapsed_s", 0.0)
        if config.qat:
            # The checkpoint's model holds the fake-quantized weights; training goes on from the float ones behind them.
            load_latent_weights(model.transformer, state["qat_latent"])
        history = read_losses(os.path.join(checkpoint, "losses.jsonl"))
        # Last: model loading above may have drawn random numbers.
        restore_rng_states(state["rng"])
    with open(os.path.join(work_dir, "train_config.json"), "w", encoding="utf-8") as handle:
        json.dump(config.to_dict(), handle, indent=2)
    losses_path = os.path.join(work_dir, "losses.jsonl")
    write_losses(losses_path, history)

    def trainer_state() -> dict:
        return {"step": step, "config": config.to_dict(), "head": head.state_dict() if head is not None else None,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "sampler": sampler.state_dict(), "rng": rng_states(),
                "elapsed_s": elapsed, "qat_latent": latent_weights(model.transformer) if config.qat else None}

    # Per `embed` call of the current micro-batch: 1 - cosine to the float reference, averaged over its texts.
    self_distillation_terms: list[torch.Tensor] = []

    def embed(texts: list[str], task_type: str) -> torch.Tensor:
        # Only the encoder under autocast: a softmax over cosines / 0.05 in half precision loses the ranking signal.
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext():
            vectors = model(texts, task_type).float()
            if reference is not None:
                with torch.no_grad():
                    targets = reference(texts, task_type).float()
                self_distillation_terms.append((1 - torch.nn.functional.cosine_similarity(vectors, targets)).mean())
        return vectors

    progress = None
    if config.progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:.1f} ex/s"))
        bar = progress.add_task("train", total=total_steps, completed=step, loss=float("nan"), rate=0.0)
        progress.start()

    # 3. optimizer steps
    try:
        with open(losses_path, "a", encoding="utf-8") as log:
            while step < total_steps:
                started = time.perf_counter()
                sums: dict[str, float] = defaultdict(float)
                seen: dict[str, int] = defaultdict(int)
                step_examples = 0
                counts: dict[str, float] = defaultdict(float)
                for _ in range(config.grad_accumulation):
                    batch = sampler.next_batch()
                    step_examples += len(batch.indices)
                    self_distillation_terms.clear()
                    terms = batch_losses(embed, head, batch, data, examples, config, dims, stats=counts)
                    if self_distillation_terms:
                        terms["qat_self_distillation"] = torch.stack(self_distillation_terms).mean()
                    weighted = [weights[name] * value for name, value in terms.items() if name in weights]
                    if not weighted:
                        continue
                    loss = torch.stack(weighted).sum()
                    # Each micro-batch's mean loss counts 1/grad_accumulation of the step.
                    scaler.scale(loss / config.grad_accumulation).backward()
                    sums["loss"] += loss.item()
                    seen["loss"] += 1
                    for name, value in terms.items():
                        sums[name] += value.item()
                        seen[name] += 1
                if config.max_grad_norm > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]],
                                                   config.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                learning_rate = scheduler.get_last_lr()[0]
                scheduler.step()
                step += 1

                # 4. log and checkpoint
                seconds = time.perf_counter() - started
                elapsed += seconds
                line = {"step": step, "epoch": sampler.state.epoch, "lr": learning_rate, "examples": step_examples,
                        "examples_per_s": step_examples / max(seconds, 1e-9)}
                line.update({name: sums[name] / seen[name] for name in sums})
                if counts["queries"]:
                    line.update({"negatives_per_query": counts["negatives"] / counts["queries"],
                                 "masked_false_negatives": int(counts["masked_false_negatives"]),
                                 "masked_repeats": int(counts["masked_repeats"])})
                history.append(line)
                log.write(json.dumps(line) + "\n")
                log.flush()
                if progress is not None:
                    progress.update(bar, completed=step, loss=line.get("loss", float("nan")),
                                    rate=line["examples_per_s"])
                if step == total_steps or (config.checkpoint_every and step % config.checkpoint_every == 0):
                    state_now = trainer_state()
                    with baked_weights(model.transformer):
                        save_checkpoint(work_dir, step, model, state_now, history, config.keep_checkpoints)
                    plot_losses(history, os.path.join(work_dir, "losses.png"))
    finally:
        if progress is not None:
            progress.stop()

    # 5. final model (with QAT: its weights are the fake-quantized ones, what `embforge quantize` stores exactly)
    with baked_weights(model.transformer):
        model.save(os.path.join(work_dir, "model"))
    plot_losses(history, os.path.join(work_dir, "losses.png"))
    with open(os.path.join(work_dir, "train_summary.json"), "w", encoding="utf-8") as handle:
        json.dump({"steps": step, "total_steps": total_steps, "epochs_started": sampler.state.epoch + 1,
                   "examples_seen": sum(line["examples"] for line in history), **batch_summary(history, config),
                   "elapsed_s": elapsed,
                   "device": str(device), "precision": str(amp_dtype or torch.float32), "qat": config.qat,
                   "teacher_dim": data.teacher_dim, "distillation_head": head is not None,
                   "data": dict(data.counts)}, handle, indent=2)
    if work_dir != config.output_dir:
        replace_folder(work_dir, config.output_dir)
    return os.path.join(config.output_dir, "model")
