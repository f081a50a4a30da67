"""Quantization-aware training and quantized export (issue #16), on a tiny random BERT (tests/tiny_student.py).

Done when: after real QAT training steps the fake-quantized weights take at most 15 (int4) / 255 (int8) values per
output channel (symmetric codes -7..7 / -127..127), training resumes exactly from its latent float weights, a quantized
export reloads and encodes within a stated tolerance of the fake-quantized model, and bad input gets one clear error.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from embedder.config import TrainConfig
from embedder.model import StudentEncoder
from embedder.qat import SCHEMES, apply_fake_quantization, channel_scales, layer_bits, quantize_weight
from embedder.quantized_model import (
    QUANTIZATION_JSON,
    QUANTIZED_WEIGHTS,
    QuantizedEmbedder,
    int8_linear,
    load_quantized,
    pack_int4,
    quantize_model,
    unpack_int4,
)
from pipelines.clients.base import TaskType
from tests.shard_factory import TOPICS, write_run
from tests.tiny_student import FEED_FORWARD, write_tiny_student

#: Lowest cosine between a text's vector from the exported model and from the fake-quantized one. int4 weights are
#: the same float values in both (dequantized at load), so only summation order differs; int8 layers run torch's
#: int8 kernels, which round activations and accumulate in int32 where the fake-quantized model computes in float.
TOLERANCE = {"int4": 0.99999, "int8": 0.999, "mixed": 0.999}
TEXTS = [" ".join(keywords) for keywords in TOPICS.values()] + ["the oven and the telescope", "bond"]


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> str:
    return write_tiny_student(str(tmp_path_factory.mktemp("student")))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    return write_run(str(tmp_path_factory.mktemp("run")))


def _config(student: str, output_dir: str, **changes) -> TrainConfig:
    # A high learning rate: in 3 steps the latent weights must cross grid points for the test to see training.
    values = dict(student=student, max_seq_length=32, batch_size=4, max_steps=3, checkpoint_every=0,
                  learning_rate=1e-2, matryoshka_dims=(32, 16), output_dir=output_dir, progress=False, seed=1)
    values.update(changes)
    return TrainConfig(**values)


def _encoder_weights(model_dir: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(model_dir, "model.safetensors"))


def _distinct_per_row(weight: torch.Tensor) -> list[int]:
    return [len(torch.unique(row)) for row in weight]


# --- QAT training -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_qat_training_steps_leave_every_channel_on_its_int_grid(scheme, student_dir, run_dir, tmp_path):
    from embedder.train import train

    model_dir = train(_config(student_dir, str(tmp_path / "qat"), qat=scheme), run_dir)
    trained, start = _encoder_weights(model_dir), _encoder_weights(student_dir)
    plan = layer_bits(StudentEncoder.load(model_dir).transformer, scheme)
    assert {name: bits for name, bits in plan.items() if "attention" in name} == {
        name: 4 if scheme == "int4" else 8 for name in plan if "attention" in name}
    for name, bits in plan.items():
        weight = trained[f"{name}.weight"]
        assert max(_distinct_per_row(weight)) <= 2 ** bits - 1, name
        # Symmetric codes: every value is an integer multiple of its channel's scale, the peak exactly +-qmax.
        codes = weight / channel_scales(weight, bits)[:, None]
        assert torch.allclose(codes, codes.round(), atol=1e-4), name
    assert any(not torch.equal(trained[key], start[key]) for key in start), "training did not move any weight"
    feed_forward_output = trained["encoder.layer.0.output.dense.weight"]
    assert feed_forward_output.shape[1] == FEED_FORWARD
    if scheme == "int8":
        assert max(_distinct_per_row(feed_forward_output)) > 15  # int8, not int4
    summary = json.load(open(tmp_path / "qat" / "train_summary.json", encoding="utf-8"))
    assert summary["qat"] == scheme and summary["steps"] == 3


def test_float_training_leaves_more_values_per_channel_than_int8_has(student_dir, run_dir, tmp_path):
    """The control of the test above: without `qat` the same check fails."""
    from embedder.train import train

    trained = _encoder_weights(train(_config(student_dir, str(tmp_path / "float")), run_dir))
    assert max(_distinct_per_row(trained["encoder.layer.0.output.dense.weight"])) > 255


@pytest.mark.parametrize("self_distillation", [0.0, 1.0])
def test_qat_resumes_exactly_from_the_latent_float_weights(self_distillation, student_dir, run_dir, tmp_path):
    """With self-distillation the resumed run must also rebuild the same float reference (the starting student)."""
    from embedder.train import train

    settings = dict(qat="int4", max_steps=4, checkpoint_every=2, qat_self_distillation_weight=self_distillation)
    whole = str(tmp_path / "whole")
    train(_config(student_dir, whole, **settings), run_dir)
    resumed = str(tmp_path / "resumed")
    train(_config(student_dir, resumed, **settings), run_dir, resume=os.path.join(whole, "checkpoints", "step-0000002"))
    expected, actual = _encoder_weights(os.path.join(whole, "model")), _encoder_weights(os.path.join(resumed, "model"))
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_qat_self_distillation_brings_the_quantized_student_back_toward_its_float_start(student_dir, run_dir,
                                                                                       tmp_path):
    """QAT on the self-distillation term alone: the int4 student's vectors end closer to the float student's than
    post-training int4 (the same model before any step), and the logged term falls."""
    from embedder.train import train

    def mean_cosine(model: StudentEncoder) -> float:
        vectors, targets = (encoder.encode(TEXTS, TaskType.RETRIEVAL_DOCUMENT) for encoder in (model, start))
        return float((vectors * targets).sum(1).mean())

    # The tiny student's vectors come almost wholly from its embeddings (int4 keeps cosine 0.99997): with its encoder's
    # linear weights 10x, its layers count and int4 rounding costs something to win back (cosine 0.978).
    start = StudentEncoder.load(student_dir)
    with torch.no_grad():
        for name, layer in start.transformer.named_modules():
            if isinstance(layer, nn.Linear) and name.startswith("encoder."):
                layer.weight.mul_(10)
    student_dir = start.save(str(tmp_path / "student"))
    post_training = StudentEncoder.load(student_dir)
    apply_fake_quantization(post_training.transformer, "int4")
    output = str(tmp_path / "self")
    trained = StudentEncoder.load(train(_config(
        student_dir, output, qat="int4", max_steps=12, learning_rate=1e-4, warmup_ratio=0, infonce_weight=0,
        distillation_weight=0, spread_out_weight=0, classification_weight=0, qat_self_distillation_weight=1.0),
        run_dir))
    trained_cosine, post_training_cosine = mean_cosine(trained), mean_cosine(post_training)
    assert 1 - trained_cosine < 0.8 * (1 - post_training_cosine), (trained_cosine, post_training_cosine)
    logged = [json.loads(line)["qat_self_distillation"] for line in open(os.path.join(output, "losses.jsonl"))]
    assert len(logged) == 12 and np.mean(logged[-3:]) < np.mean(logged[:3])


def test_fake_quantization_passes_the_gradient_straight_through_to_the_latent_weight():
    layer = nn.Linear(6, 3)
    apply_fake_quantization(nn.ModuleDict({"dense": layer}), "int4")
    latent = layer.parametrizations.weight.original
    inputs = torch.randn(5, 6)
    layer(inputs).sum().backward()
    # d(sum(x W^T))/dW = column sums of x for every row, as if the rounding were not there.
    assert torch.allclose(latent.grad, inputs.sum(0).expand(3, 6))


def test_an_int4_channel_clips_its_rare_large_weights_when_that_lowers_its_error():
    torch.manual_seed(0)
    weight = torch.randn(4, 256)
    weight[:, 0] = 12.0  # one outlier a channel: scaling to it would leave most weights on 3 or 4 codes
    scale = channel_scales(weight, 4)
    assert (scale < 12.0 / 7).all()

    def squared_error(scales):
        return ((weight / scales[:, None]).round().clamp(-7, 7) * scales[:, None] - weight).square().sum()
    assert squared_error(scale) < 0.75 * squared_error(weight.abs().amax(1) / 7)  # 0.69 here
    # Quantized weights keep their scale (an export finds the codes training used), and int8 scales never clip.
    baked = (weight / scale[:, None]).round().clamp(-7, 7) * scale[:, None]
    assert torch.allclose(channel_scales(baked, 4), scale)
    assert torch.equal(channel_scales(weight, 8), weight.abs().amax(1) / 127)


# --- export -----------------------------------------------------------------------------------------------------------


def test_a_fake_quantized_int8_layer_computes_what_the_exported_int8_kernel_computes():
    """QAT rounds an int8 layer's input as the exported int8 kernel does (asymmetric, 0..255), so training sees the
    error the exported model makes; with 7-bit codes on either side (torch's own dynamic layer) they differ by ~0.1."""
    torch.manual_seed(0)
    layer = nn.Linear(32, 320)
    inputs = 3 * torch.randn(50, 32)
    codes, scale = quantize_weight(layer.weight, 8)
    exported = int8_linear(layer, codes, scale)(inputs)
    apply_fake_quantization(nn.ModuleDict({"dense": layer}), "int8")
    assert torch.allclose(layer(inputs), exported, atol=1e-4)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_export_reloads_and_encodes_within_tolerance_of_the_fake_quantized_model(scheme, student_dir,
                                                                                          tmp_path):
    fake = StudentEncoder.load(student_dir)
    plan = apply_fake_quantization(fake.transformer, scheme)
    output = quantize_model(student_dir, scheme, str(tmp_path / scheme))
    assert not os.path.exists(os.path.join(output, "model.safetensors"))
    loaded = load_quantized(output)
    for task_type in (TaskType.RETRIEVAL_QUERY, TaskType.RETRIEVAL_DOCUMENT):
        cosines = (fake.encode(TEXTS, task_type) * loaded.encode(TEXTS, task_type)).sum(1)
        assert cosines.min() >= TOLERANCE[scheme], (task_type, cosines.min())

    stored = load_file(os.path.join(output, QUANTIZED_WEIGHTS))
    for name, bits in plan.items():
        codes = stored[f"{name}.weight.codes"]
        rows, columns = fake.transformer.get_submodule(name).parametrizations.weight.original.shape
        # int4: two codes a byte; int8: one.
        assert (codes.dtype, codes.numel()) == ((torch.uint8, rows * columns // 2) if bits == 4
                                                else (torch.int8, rows * columns)), name
        module = loaded.transformer.get_submodule(name)
        real_int8 = isinstance(module, torch.ao.nn.quantized.dynamic.Linear)
        assert real_int8 == (bits == 8 and "embeddings" not in name), name
        if real_int8:  # the kernel multiplies by exactly the stored codes
            assert torch.equal(module.weight().int_repr(), codes), name
    card = open(os.path.join(output, "README.md"), encoding="utf-8").read()
    assert ("**stored packed and dequantized at load**" in card) == (scheme != "int8")
    assert ("int8 matrix products" in card) == (scheme != "int4")
    info = json.load(open(os.path.join(output, QUANTIZATION_JSON), encoding="utf-8"))
    assert info["precision"] == scheme and info["bits"] == plan


def test_a_qat_student_exports_to_exactly_the_weights_it_was_trained_with(student_dir, run_dir, tmp_path):
    from embedder.train import train

    model_dir = train(_config(student_dir, str(tmp_path / "qat"), qat="int4"), run_dir)
    trained = _encoder_weights(model_dir)
    loaded = load_quantized(quantize_model(model_dir, "int4", str(tmp_path / "int4"))).transformer.state_dict()
    for name in trained:
        assert torch.allclose(trained[name], loaded[name], atol=1e-6), name


def test_the_quantized_embedder_reports_its_weight_precision_and_embeds_unit_vectors(student_dir, tmp_path):
    embedder = QuantizedEmbedder(quantize_model(student_dir, "mixed", str(tmp_path / "mixed")), max_seq_length=16)
    vectors = embedder.embed(TEXTS, TaskType.RETRIEVAL_DOCUMENT, dimension=16)
    assert embedder.weight_precision == "mixed" and embedder.max_seq_length == 16
    assert vectors.shape == (len(TEXTS), 16) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("count", [6, 7])
def test_int4_packing_round_trips_every_code(count):
    codes = torch.tensor([-8, -7, -1, 0, 1, 7, 3][:count], dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (count + 1) // 2
    assert torch.equal(unpack_int4(packed, (count,)), codes)


# --- bad input --------------------------------------------------------------------------------------------------------


def test_quantize_names_what_is_wrong(student_dir, tmp_path):
    with pytest.raises(ValueError, match=r"--precision 'int3'"):
        quantize_model(student_dir, "int3", str(tmp_path / "out"))
    (tmp_path / "not_a_model").mkdir()
    with pytest.raises(ValueError, match=r"not_a_model/modules.json: not found"):
        quantize_model(str(tmp_path / "not_a_model"), "int8", str(tmp_path / "out"))
    quantized = quantize_model(student_dir, "int8", str(tmp_path / "int8"))
    with pytest.raises(ValueError, match=r"quantization.json: this model is already quantized"):
        quantize_model(quantized, "int4", str(tmp_path / "out"))
    with pytest.raises(ValueError, match="has no linear layers: nothing to quantize to int4"):
        layer_bits(nn.ModuleDict({"embeddings": nn.Embedding(4, 4)}), "int4")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / QUANTIZATION_JSON).write_text("{")
    with pytest.raises(ValueError, match=r"broken/quantization.json: cannot read"):
        load_quantized(str(tmp_path / "broken"))
    assert "qat: 'int2' (expected one of int8, int4, mixed" in TrainConfig(qat="int2").problems()[0]
    assert TrainConfig(qat_self_distillation_weight=1.0).problems() == [
        "qat_self_distillation_weight: 1.0 needs qat set (a float model distilled onto itself learns nothing)"]
    assert "qat_self_distillation_weight: must be >= 0" in TrainConfig(qat="int4",
                                                                       qat_self_distillation_weight=-1).problems()


def test_quantize_replaces_an_earlier_output_only_once_the_new_one_is_written(student_dir, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "earlier.txt").write_text("a user's earlier model")
    with pytest.raises(ValueError):
        quantize_model(str(tmp_path / "missing"), "int8", str(output))
    assert (output / "earlier.txt").exists()
    quantize_model(student_dir, "int8", str(output))
    assert not (output / "earlier.txt").exists() and (output / QUANTIZED_WEIGHTS).exists()
    assert not any(name.endswith(".staging") for name in os.listdir(tmp_path))
