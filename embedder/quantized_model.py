"""Quantized students: `embforge quantize` writes them, `load_quantized` reads them, `QuantizedEmbedder` evaluates them.

A quantized model folder is the student's sentence-transformers folder (tokenizer, config.json, pooling, prompts)
with its encoder weights in `quantized.safetensors` instead of `model.safetensors`:

    quantized.safetensors   for each weight of the scheme (`embedder.qat.layer_bits`): `<module>.weight.codes`
                            (int8, or int4 packed two to a byte, low nibble first) and `<module>.weight.scale`
                            (float32, one per output channel); every other tensor (biases, LayerNorm, position
                            embeddings) in float32
    quantization.json       format, precision, bits per module, how each precision runs
    README.md               the model card: what is stored and how it runs

At load, int8 linear layers become torch dynamic-quantized linear layers built from the stored codes and scales
(`Int8Linear`): their matrix products run in int8 on the CPU (oneDNN kernels; activations quantized per batch). int4
has no CPU kernel in this torch: int4 weights are dequantized to float32 at load, so they save disk and download size,
not memory or time. The word embeddings are int8 codes dequantized at load (a lookup needs no kernel). Separate from
`embedder.qat`, which defines the scheme, because this module is about files and inference.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel

from embedder.model import StudentEncoder
from embedder.qat import SCHEMES, layer_bits, quantize_weight
from pipelines.clients.base import Embedder, TaskType, truncate_and_normalize
from pipelines.clients.packaged_models import cap_torch_threads, directory_version
from pipelines.clients.task_prompts import prompt_name
from pipelines.outputs import replace_folder, sibling_staging_path

QUANTIZATION_JSON = "quantization.json"
QUANTIZED_WEIGHTS = "quantized.safetensors"
FORMAT = "embforge.quantized"
FORMAT_VERSION = 1
#: How each precision runs once loaded, as the model card and quantization.json say it.
RUNTIME = {
    "int8": "int8 codes; linear layers run as torch dynamic-quantized int8 matrix products on the CPU (oneDNN; "
            "activations quantized to 8 bits per batch)",
    "int4": "int4 codes packed two per byte; no int4 CPU kernel here, so they are dequantized to float32 at load "
            "(smaller on disk, same memory and speed as float32)",
    "mixed": "attention layers int8 (int8 matrix products on the CPU), feed-forward layers int4 (dequantized to "
             "float32 at load)",
}
CODES, SCALE = ".weight.codes", ".weight.scale"


def is_quantized_model(path: str) -> bool:
    return os.path.isfile(os.path.join(path, QUANTIZATION_JSON))


# --- int4 packing -----------------------------------------------------------------------------------------------------


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes in [-8, 7] -> uint8, two per byte (first code in the low nibble); an odd count is padded with a 0."""
    flat = codes.flatten().to(torch.int16)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    nibbles = (flat & 0x0F).to(torch.uint8)
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of `pack_int4`: int8 codes of `shape`."""
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=1).flatten().to(torch.int16)
    signed = torch.where(nibbles > 7, nibbles - 16, nibbles)
    count = int(np.prod(shape))
    return signed[:count].to(torch.int8).reshape(tuple(shape))


# --- export -----------------------------------------------------------------------------------------------------------


def quantize_model(model_dir: str, precision: str, output_dir: str) -> str:
    """Write `model_dir` (a float student folder) quantized to `precision` into `output_dir`; returns `output_dir`.

    The new folder is written beside `output_dir` and replaces it only once complete.
    """
    if precision not in SCHEMES:
        raise ValueError(f"--precision {precision!r}: expected one of {', '.join(SCHEMES)}")
    if is_quantized_model(model_dir):
        raise ValueError(f"{model_dir}/{QUANTIZATION_JSON}: this model is already quantized; give the float model")
    if not os.path.isfile(os.path.join(model_dir, "modules.json")):
        raise ValueError(f"{model_dir}/modules.json: not found; MODEL must be a sentence-transformers model folder "
                         "(what `embforge train` writes)")
    model = StudentEncoder.load(model_dir)
    try:
        plan = layer_bits(model.transformer, precision)
    except ValueError as error:
        raise ValueError(f"{model_dir}: {error}") from error
    staging = sibling_staging_path(os.path.abspath(output_dir))
    shutil.rmtree(staging, ignore_errors=True)
    model.save(staging)
    os.remove(os.path.join(staging, "model.safetensors"))
    tensors = {}
    for key, value in model.transformer.state_dict().items():
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and module in plan:
            codes, scale = quantize_weight(value, plan[module])
            tensors[module + CODES] = pack_int4(codes) if plan[module] == 4 else codes
            tensors[module + SCALE] = scale
        else:
            tensors[key] = value.detach().float().contiguous()
    save_file(tensors, os.path.join(staging, QUANTIZED_WEIGHTS), metadata={"format": FORMAT})
    info = {"format": FORMAT, "version": FORMAT_VERSION, "precision": precision,
            "scheme": "symmetric, one float32 scale per output channel (per row for embeddings), zero point 0: "
                      "int8 scale = max|w| / 127; int4 scale = c * max|w| / 7, c in 0.50..1.00 minimising the "
                      "channel's squared error",
            "runtime": RUNTIME[precision], "bits": plan, "source": os.path.abspath(model_dir)}
    with open(os.path.join(staging, QUANTIZATION_JSON), "w", encoding="utf-8") as handle:
        json.dump(info, handle, indent=2)
        handle.write("\n")
    with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(model_card(info, folder_megabytes(staging)))
    replace_folder(staging, output_dir)
    return output_dir


def folder_megabytes(path: str) -> float:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names) / 1e6


def model_card(info: dict, megabytes: float) -> str:
    counts = {bits: sum(1 for value in info["bits"].values() if value == bits) for bits in (8, 4)}
    return "\n".join([
        f"# {info['precision']} student (embforge)", "",
        f"Quantized from `{info['source']}` by `embforge quantize --precision {info['precision']}`; "
        f"{megabytes:.1f} MB on disk.", "",
        f"- Weights: {counts[8]} tensors int8, {counts[4]} int4 (the encoder's linear layers and its word embeddings); "
        "biases, LayerNorm, position embeddings and any projection after pooling float32.",
        f"- Scheme: {info['scheme']}.",
        f"- How it runs: {info['runtime']}.",
        "- Word embeddings: int8 codes, dequantized to float32 at load.",
        "- int4 weights are **stored packed and dequantized at load**: no int4 CPU kernel is used, so int4 makes the "
        "model smaller on disk, not faster." if counts[4] else "- No int4 weights.",
        "", "Load it with embforge (sentence-transformers cannot read `quantized.safetensors`):", "",
        "```python", "from embedder.quantized_model import load_quantized",
        "model = load_quantized('THIS_FOLDER')", "vectors = model.encode(['a text'], 'RETRIEVAL_DOCUMENT')", "```", "",
        "or evaluate it: `embforge evaluate --model int=THIS_FOLDER --retrieval BEIR_DIR`.", ""])


# --- load -------------------------------------------------------------------------------------------------------------


def read_quantization_info(model_dir: str) -> dict:
    path = os.path.join(model_dir, QUANTIZATION_JSON)
    try:
        with open(path, encoding="utf-8") as handle:
            info = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read ({error})") from error
    if info.get("format") != FORMAT or info.get("version") != FORMAT_VERSION or info.get("precision") not in SCHEMES:
        raise ValueError(f"{path}: not an embforge quantized model of format version {FORMAT_VERSION}")
    return info


class Int8Linear(torch.ao.nn.quantized.dynamic.Linear):
    """torch's dynamic int8 linear layer with 8-bit activations, its weights packed for oneDNN where torch has it.

    torch's own layer asks its kernel for 7-bit activations (`reduce_range=True`), a guard for fbgemm's AVX2 kernels,
    whose int16 pair sums could saturate; that halves the activations' resolution, and it was the whole loss of int8:
    on all-MiniLM-L6-v2 (200 SciFact passages, mean cosine to the float vectors) int8 weights alone give 0.9994,
    adding 7-bit activations 0.981, 8-bit ones 0.995. oneDNN accumulates in int32 and takes 8 bits; it is also the
    faster kernel on the CPUs measured (a 6,400 x 384 x 1,536 product: float 46 ms, fbgemm 31 ms, oneDNN 24 ms).
    Those were CPUs with AVX-512 VNNI, which multiply-add u8 x s8 straight into int32. Older CPUs (AVX2 / AVX-512
    without VNNI) sum byte pairs in int16 first; oneDNN's guide "Nuances of int8 computations" says how its primitives
    keep those sums from saturating. That path was not measured here.
    """

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(inputs, self._packed_params._packed_params, reduce_range=False)


@contextmanager
def _packing_engine() -> Iterator[None]:
    """Weights packed inside are packed for oneDNN (they run on its kernels whatever the engine later is)."""
    previous = torch.backends.quantized.engine
    if "onednn" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "onednn"
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def int8_linear(linear: nn.Linear, codes: torch.Tensor, scale: torch.Tensor) -> Int8Linear:
    """An `Int8Linear` holding exactly `codes` and `scale` (int8 matrix products on the CPU)."""
    with warnings.catch_warnings(), _packing_engine():
        # torch 2.x marks quantized tensor constructors deprecated in favour of torchao, which is not installed here;
        # they still are what the built-in dynamic int8 kernels take.
        warnings.simplefilter("ignore", UserWarning)
        # codes * scale / scale rounds back to exactly the codes: the stored codes are what the kernel multiplies by.
        weight = torch.quantize_per_channel(codes.float() * scale[:, None], scale.double(),
                                            torch.zeros(len(scale), dtype=torch.long), 0, torch.qint8)
        layer = Int8Linear(linear.in_features, linear.out_features, dtype=torch.qint8)
        layer.set_weight_bias(weight, None if linear.bias is None else linear.bias.detach().clone())
    return layer


def load_quantized(model_dir: str) -> StudentEncoder:
    """The student of a quantized folder, ready for inference on the CPU (see the module docstring)."""
    info = read_quantization_info(model_dir)
    transformer = AutoModel.from_config(AutoConfig.from_pretrained(model_dir))
    tensors = load_file(os.path.join(model_dir, QUANTIZED_WEIGHTS))
    bits = {module: int(value) for module, value in info["bits"].items()}
    try:
        scales = {module: tensors.pop(module + SCALE) for module in bits}
        stored = {module: tensors.pop(module + CODES) for module in bits}
    except KeyError as error:
        raise ValueError(f"{model_dir}/{QUANTIZED_WEIGHTS}: lacks {error}, which {QUANTIZATION_JSON} lists") from error
    codes = {module: unpack_int4(stored[module], transformer.get_submodule(module).weight.shape) if module_bits == 4
             else stored[module] for module, module_bits in bits.items()}
    state = {**tensors, **{module + ".weight": codes[module].float() * scales[module][:, None] for module in bits}}
    missing, unexpected = transformer.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{model_dir}/{QUANTIZED_WEIGHTS}: does not match config.json (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    for module, module_bits in bits.items():
        layer = transformer.get_submodule(module)
        if module_bits == 8 and isinstance(layer, nn.Linear):
            parent, _, child = module.rpartition(".")
            setattr(transformer.get_submodule(parent), child,
                    int8_linear(layer, codes[module], scales[module]))
    model = StudentEncoder.load(model_dir, transformer=transformer)
    return model.eval()


class QuantizedEmbedder(Embedder):
    """A quantized student folder as an `Embedder`, for `embforge evaluate` and the benchmarks."""

    def __init__(self, model_dir: str, *, max_seq_length: int | None = None, batch_size: int = 32,
                 torch_threads: int | None = None):
        super().__init__()
        cap_torch_threads(torch_threads)
        self.info = read_quantization_info(model_dir)
        self._model = load_quantized(model_dir)
        if max_seq_length is not None:
            self._model.max_seq_length = max_seq_length
        self.model_id = model_dir
        self.model_version = directory_version(model_dir)
        self.native_dimension = self._model.dimension
        self.max_seq_length = self._model.max_seq_length
        self.weight_precision = self.info["precision"]
        self.batch_size = batch_size
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str], task_type: TaskType, dimension: int | None = None) -> np.ndarray:
        dimension = dimension or self.native_dimension
        # As LocalEmbedder: a task type the model has no prompt for embeds the bare text.
        task = task_type if prompt_name(task_type) in self._model.prompts else None
        with self._lock:
            vectors = self._model.encode(list(texts), task, batch_size=self.batch_size) if texts else (
                np.zeros((0, self.native_dimension), dtype=np.float32))
        for _ in range(math.ceil(len(texts) / self.batch_size)):
            self.stats.record()  # one per forward pass, as LocalEmbedder counts
        return truncate_and_normalize(vectors, dimension)
