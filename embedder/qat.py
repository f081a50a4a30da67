"""Weight quantization schemes of the student, and quantization-aware training (QAT) by fake quantization.

One scheme serves training and export, so a model trained with `train.qat = "int4"` is exported by `embforge quantize
--precision int4` to the very codes it was trained with (`embedder.quantized_model`):

- every `nn.Linear` of the encoder, and its input (word) embeddings, get symmetric per-output-channel (per-row for the
  embeddings) scales: code = round(w / scale) clipped to [-qmax, qmax], qmax = 127 (int8) or 7 (int4); the zero point
  is 0, so int8 takes at most 255 values and int4 at most 15 per channel;
- int8 scales are max |w| / 127. An int4 channel's scale clips: of the clipping points 0.50, 0.52, ... 1.00 x max |w|,
  the one with the least squared error over the channel wins, the rarer large weights giving up precision to the
  bulk. Measured on all-MiniLM-L6-v2 (200 SciFact passages, mean cosine to the float vectors): int4 linear layers
  0.859 at max |w|, 0.911 clipped; for int8 clipping changes nothing measurable (0.99936 / 0.99939). Re-quantizing
  quantized weights finds the same scale (the unclipped point is exact), so an export reproduces the trained codes;
- "int8": every linear layer int8; "int4": every linear layer int4; "mixed": int8 for attention (query, key, value and
  attention output), whose errors every later token mixes in, and int4 for the feed-forward layers, which hold two
  thirds of a BERT layer's weights;
- the word embeddings are int8 in every scheme: they are half of all-MiniLM-L6-v2's weights, so leaving them float
  would keep half the model at full size, and a lookup needs no int8 kernel (they are dequantized at load).

QAT registers a parametrization on each of those weights: the forward pass sees `fake_quantize_per_channel_affine` of
the latent float weight, and its backward pass is the straight-through estimator (the gradient passes unchanged to
the latent weight, except to values an int4 scale clips, which get none).
The inputs of int8 linear layers are fake-quantized too, as the exported model's dynamic int8 kernels quantize them
(`fake_quantize_activation`, 8 bits); int4 layers run in float after export, so their inputs stay float.
Separate from `embedder.train` so that the export, the trainer and the tests read one definition.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize

from embedder.config import QAT_SCHEMES as SCHEMES

#: Bits of the input embeddings in every scheme (see the module docstring).
EMBEDDING_BITS = 8
#: An int8 layer's input codes: 0..255, a full 8 bits (see `embedder.quantized_model.Int8Linear`).
ACTIVATION_LARGEST_CODE = 255
#: Clipping points tried for an int4 channel, as fractions of its largest |weight|, the unclipped one first.
CLIP_FRACTIONS = tuple(1.0 - step / 50 for step in range(26))


def largest_code(bits: int) -> int:
    """qmax of a symmetric signed code: 127 for 8 bits, 7 for 4 (the -128 / -8 code is left out to stay symmetric)."""
    return 2 ** (bits - 1) - 1


def channel_scales(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """One float32 scale per row (output channel), as the module docstring says; an all-zero row gets 1 (its codes are
    0 anyway)."""
    rows = weight.detach().float()
    qmax = largest_code(bits)
    peak = rows.abs().amax(dim=1)
    best = torch.where(peak > 0, peak / qmax, torch.ones_like(peak))
    if bits >= 8:
        return best
    best_error = _rounding_error(rows, best, qmax)
    # From the unclipped point down, a clipping point replacing the best only when strictly better: an already
    # quantized row keeps its exact scale.
    for fraction in CLIP_FRACTIONS[1:]:
        candidate = torch.where(peak > 0, peak * fraction / qmax, torch.ones_like(peak))
        error = _rounding_error(rows, candidate, qmax)
        better = error < best_error
        best, best_error = torch.where(better, candidate, best), torch.where(better, error, best_error)
    return best


def _rounding_error(rows: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """Each row's squared error when quantized with its `scale` and codes clipped to [-qmax, qmax]."""
    steps = scale[:, None]
    return ((rows / steps).round().clamp(-qmax, qmax) * steps - rows).square().sum(dim=1)


def fake_quantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """`weight` rounded to its per-channel grid, in float; the gradient passes straight through."""
    scale = channel_scales(weight, bits).to(weight.device)
    zero_point = torch.zeros(weight.shape[0], dtype=torch.int32, device=weight.device)
    qmax = largest_code(bits)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, -qmax, qmax)


def fake_quantize_activation(inputs: torch.Tensor) -> torch.Tensor:
    """`inputs` as the exported model's int8 linear layers see them (`embedder.quantized_model.Int8Linear`): one
    asymmetric scale for the whole tensor from its min and max (0 included), codes 0..255; the gradient passes
    straight through."""
    low, high = inputs.detach().min().clamp(max=0), inputs.detach().max().clamp(min=0)
    scale = ((high - low) / ACTIVATION_LARGEST_CODE).clamp(min=1e-8).float().reshape(1)
    zero_point = torch.round(-low / scale).clamp(0, ACTIVATION_LARGEST_CODE).to(torch.int32).reshape(1)
    # In float32: under autocast the inputs may be half precision, which the fake-quantization kernels may not take.
    return torch.fake_quantize_per_tensor_affine(inputs.float(), scale, zero_point, 0,
                                                 ACTIVATION_LARGEST_CODE).to(inputs.dtype)


def _quantize_linear_input(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (fake_quantize_activation(inputs[0]), *inputs[1:])


def quantize_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, float32 scales per row) of `weight`; codes * scale[:, None] == fake_quantize(weight, bits).

    The codes are read back from the fake-quantized tensor, so export and training round every value the same way.
    """
    scale = channel_scales(weight, bits)
    codes = torch.round(fake_quantize(weight.detach().float(), bits) / scale[:, None].to(weight.device))
    return codes.to(torch.int8).cpu(), scale.cpu()


def layer_bits(transformer: nn.Module, scheme: str) -> dict[str, int]:
    """Module name (in `transformer`) -> bits, for every weight the scheme quantizes."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown weight precision {scheme!r} (expected one of {', '.join(SCHEMES)})")
    plan = {}
    for name, module in transformer.named_modules():
        if isinstance(module, nn.Linear):
            # "attention" (BERT), "attn" (self_attn, attn_output, ... in most other encoders).
            attention = any("attention" in part or "attn" in part for part in name.split("."))
            plan[name] = 4 if scheme == "int4" or (scheme == "mixed" and not attention) else 8
    if not plan:
        raise ValueError(f"{type(transformer).__name__} has no linear layers: nothing to quantize to {scheme}")
    embeddings = transformer.get_input_embeddings() if hasattr(transformer, "get_input_embeddings") else None
    if isinstance(embeddings, nn.Embedding):
        plan[next(name for name, module in transformer.named_modules() if module is embeddings)] = EMBEDDING_BITS
    return plan


class FakeQuantize(nn.Module):
    """Parametrization: the weight the forward pass sees is its fake-quantized latent weight."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize(weight, self.bits)


def apply_fake_quantization(transformer: nn.Module, scheme: str) -> dict[str, int]:
    """Fake-quantize the scheme's weights of `transformer` from now on; returns the plan (module name -> bits).

    The latent float weights stay the parameters an optimizer updates (the same tensor objects as before).
    """
    plan = layer_bits(transformer, scheme)
    for name, bits in plan.items():
        module = transformer.get_submodule(name)
        parametrize.register_parametrization(module, "weight", FakeQuantize(bits))
        if bits == 8 and isinstance(module, nn.Linear):
            # An exported int8 layer quantizes its input too (`embedder.quantized_model`): training sees that error.
            module.register_forward_pre_hook(_quantize_linear_input)
    return plan


def fake_quantized_modules(transformer: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in transformer.named_modules()
            if parametrize.is_parametrized(module, "weight")}


def latent_weights(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The float weights behind the fake quantization, for a checkpoint (the saved model holds the quantized ones)."""
    return {name: module.parametrizations.weight.original.detach().cpu().clone()
            for name, module in fake_quantized_modules(transformer).items()}


def load_latent_weights(transformer: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    modules = fake_quantized_modules(transformer)
    if set(modules) != set(weights):
        raise ValueError(f"checkpoint's latent weights are for {sorted(weights)[:3]}..., the model fake-quantizes "
                         f"{sorted(modules)[:3]}...")
    with torch.no_grad():
        for name, module in modules.items():
            module.parametrizations.weight.original.copy_(weights[name])


@contextmanager
def baked_weights(transformer: nn.Module) -> Iterator[None]:
    """Inside: plain modules whose weights are the fake-quantized values (what `save_pretrained` writes); after: the
    parametrizations again, around the very same latent parameters (an optimizer holding them keeps working)."""
    modules = fake_quantized_modules(transformer)
    saved = {name: (module.parametrizations.weight.original.detach().clone(), module.parametrizations.weight[0].bits)
             for name, module in modules.items()}
    for module in modules.values():
        # Keeps the parameter object and overwrites its values with the quantized ones: restored below.
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    try:
        yield
    finally:
        for name, (latent, bits) in saved.items():
            with torch.no_grad():
                modules[name].weight.copy_(latent)
            parametrize.register_parametrization(modules[name], "weight", FakeQuantize(bits))
