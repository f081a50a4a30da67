"""Model soup (Wortsman et al. 2022, used by Gemini Embedding and EmbeddingGemma): average the weights of students
fine-tuned from the same start, e.g. runs with other seeds or data mixtures, or checkpoints of one run.

`soup(model_dirs, weights, output_dir)` accepts model directories (`.../model`), checkpoints (`.../step-0000500`)
and run directories (their final `model/`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from embedder.model import StudentEncoder
from pipelines.outputs import remove_tree, replace_folder, sibling_staging_path


def model_directory(path: str) -> str:
    """The sentence-transformers directory behind a model, checkpoint or run directory."""
    for candidate in (path, os.path.join(path, "model")):
        if os.path.isfile(os.path.join(candidate, "modules.json")):
            return candidate
    raise FileNotFoundError(f"{path}: not a model directory (no modules.json), nor a checkpoint or run with a model/")


def soup(model_dirs: Sequence[str], weights: Sequence[float] | None = None, output_dir: str | None = None) -> str:
    """Weighted average of the models' parameters, saved as one model in `output_dir`; returns `output_dir`.

    `weights` default to uniform and are normalized to sum to 1. Models must share architecture, parameter names and
    shapes, projection and prompts: averaging weights is only meaningful for models fine-tuned from one start.
    """
    if output_dir is None:
        raise ValueError("soup: output_dir is required")
    if not model_dirs:
        raise ValueError("soup: no models given")
    if weights is None:
        weights = [1.0] * len(model_dirs)
    weights = [float(weight) for weight in weights]
    if len(weights) != len(model_dirs):
        raise ValueError(f"soup: {len(weights)} weights for {len(model_dirs)} models")
    if any(weight < 0 for weight in weights) or not sum(weights) > 0:
        raise ValueError(f"soup: weights must be >= 0 and sum to more than 0, got {weights}")
    total = sum(weights)

    directories = [model_directory(path) for path in model_dirs]
    base = StudentEncoder.load(directories[0])
    base_state = base.state_dict()
    # float64 accumulators: averaging many float32 models in float32 would add rounding at every addition.
    averaged = {name: torch.zeros_like(value, dtype=torch.float64) for name, value in base_state.items()
                if value.is_floating_point()}
    for directory, weight in zip(directories, weights, strict=True):
        model = base if directory == directories[0] else StudentEncoder.load(directory)
        _check_compatible(directories[0], base, directory, model)
        state = model.state_dict()
        for name, value in state.items():
            if name in averaged:
                averaged[name] += value.to(torch.float64) * (weight / total)
            elif not torch.equal(value, base_state[name]):
                # Integer buffers (position ids) cannot be averaged; they must agree.
                raise ValueError(f"soup: {directory} differs from {directories[0]} in non-float buffer {name!r}")
    base.load_state_dict({name: averaged[name].to(value.dtype) if name in averaged else value
                          for name, value in base_state.items()})
    # Written aside and swapped in: an earlier model in `output_dir` is replaced only by a complete one.
    staging = sibling_staging_path(output_dir)
    remove_tree(staging)
    base.save(staging)
    replace_folder(staging, output_dir)
    return output_dir


def _check_compatible(first_dir: str, first: StudentEncoder, other_dir: str, other: StudentEncoder) -> None:
    problems = []
    first_config, other_config = first.transformer.config, other.transformer.config
    if (first_config.model_type, first_config.architectures) != (other_config.model_type, other_config.architectures):
        problems.append(f"architecture {first_config.model_type}/{first_config.architectures} vs "
                        f"{other_config.model_type}/{other_config.architectures}")
    first_shapes = {name: tuple(value.shape) for name, value in first.state_dict().items()}
    other_shapes = {name: tuple(value.shape) for name, value in other.state_dict().items()}
    if first_shapes.keys() != other_shapes.keys():
        missing = sorted(first_shapes.keys() ^ other_shapes.keys())
        problems.append(f"parameters present in only one model: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    else:
        differing = [name for name in first_shapes if first_shapes[name] != other_shapes[name]]
        if differing:
            name = differing[0]
            problems.append(f"{len(differing)} parameters differ in shape, e.g. {name} {first_shapes[name]} vs "
                            f"{other_shapes[name]}")
    if first.prompts != other.prompts:
        problems.append("task prompts differ")
    if first.max_seq_length != other.max_seq_length:
        problems.append(f"max_seq_length {first.max_seq_length} vs {other.max_seq_length}")
    if problems:
        raise ValueError(f"soup: {other_dir} is not compatible with {first_dir}: " + "; ".join(problems))
