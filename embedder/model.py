"""The student: a transformers encoder, attention-masked mean pooling, an optional linear projection, L2 normalization.

`save` writes a sentence-transformers directory, so `SentenceTransformer(dir).encode(texts, prompt_name=TASK_TYPE)`
and `LocalEmbedder(dir).embed(texts, TASK_TYPE)` give the same vectors as `StudentEncoder.load(dir).encode(texts,
TASK_TYPE)` (prompt names: `pipelines.clients.task_prompts`, the one table all three read):

    modules.json                      Transformer (root) -> Pooling (mean) -> [Dense (identity)] -> Normalize
    config.json, model.safetensors, tokenizer files, sentence_bert_config.json   (the Transformer module, in the root
                                      as sentence-transformers saves it, so plain `AutoModel.from_pretrained` works too)
    1_Pooling/config.json
    2_Dense/config.json + model.safetensors            (only with a projection)
    N_Normalize/
    config_sentence_transformers.json  prompts (prompt name = TaskType name -> prefix, plus the "query"/"document"
                                       aliases `encode_query` / `encode_document` read)

Module type names use the `sentence_transformers.models.*` spelling that every release since 2.x loads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoTokenizer

from pipelines.clients.base import TaskType, truncate_and_normalize
from pipelines.clients.task_prompts import PROMPT_NAMES, prompt_name, prompts_by_task_type, prompts_to_save


def mean_pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors that are not padding (prompt tokens included, as sentence-transformers does)."""
    mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
    summed = (token_embeddings * mask).sum(dim=1)
    # clamp: an all-padding row (cannot happen with a [CLS] token, but costs nothing) divides by 1e-9, not 0.
    return summed / mask.sum(dim=1).clamp(min=1e-9)


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _write_json(path: str, value: object) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2, sort_keys=True)
        handle.write("\n")


class StudentEncoder(nn.Module):
    def __init__(self, transformer: nn.Module, tokenizer, *, max_seq_length: int, prompts: Mapping[str, str],
                 projection: nn.Linear | None = None, default_prompt_name: str | None = None):
        super().__init__()
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.prompts = dict(prompts)
        self.projection = projection
        self.default_prompt_name = default_prompt_name

    # ---- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model_name_or_path: str, *, max_seq_length: int | None = None,
                        prompts: Mapping[str, str] | None = None, projection_dim: int | None = None,
                        default_prompt_name: str | None = None) -> StudentEncoder:
        """Start a student from a sentence-transformers directory (mean pooling only) or any transformers encoder.

        A directory saved by `save` (or by sentence-transformers with mean pooling and an identity Dense) keeps its
        projection, prompts and max length unless they are given here. A new projection is added when
        `projection_dim` is set and the model has none.
        """
        if os.path.isfile(os.path.join(model_name_or_path, "modules.json")):
            model = cls.load(model_name_or_path)
        else:
            transformer = AutoModel.from_pretrained(model_name_or_path)
            tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
            model = cls(transformer, tokenizer, max_seq_length=min(tokenizer.model_max_length, 512), prompts={})
        if max_seq_length is not None:
            model.max_seq_length = max_seq_length
        if prompts is not None:
            model.prompts = dict(prompts)
        if default_prompt_name is not None:
            model.default_prompt_name = default_prompt_name
        if projection_dim is not None:
            if model.projection is None:
                # Identity-free plain linear map: sentence-transformers' Dense with an Identity activation.
                model.projection = nn.Linear(model.hidden_size, projection_dim)
            elif model.projection.out_features != projection_dim:
                raise ValueError(f"{model_name_or_path}: has a projection to {model.projection.out_features} dims, "
                                 f"config asks for projection_dim={projection_dim}")
        return model

    @classmethod
    def load(cls, model_dir: str, *, transformer: nn.Module | None = None) -> StudentEncoder:
        """Load a sentence-transformers directory made of Transformer, mean Pooling, optional Dense, Normalize.

        `transformer`: an encoder already built from the folder's weights (a quantized export's, which
        `AutoModel.from_pretrained` cannot read), used instead of loading them.
        """
        modules = _read_json(os.path.join(model_dir, "modules.json"))
        kinds = [module["type"].rsplit(".", 1)[-1] for module in modules]
        allowed = (["Transformer", "Pooling", "Dense", "Normalize"], ["Transformer", "Pooling", "Normalize"],
                   ["Transformer", "Pooling", "Dense"], ["Transformer", "Pooling"])
        if kinds not in [list(option) for option in allowed]:
            raise ValueError(f"{model_dir}/modules.json: modules {kinds} are not Transformer -> Pooling -> "
                             "[Dense] -> [Normalize], which is all StudentEncoder supports")
        paths = {kind: os.path.join(model_dir, module["path"]) for kind, module in zip(kinds, modules, strict=True)}
        pooling = _read_json(os.path.join(paths["Pooling"], "config.json"))
        mean = pooling.get("pooling_mode") == "mean" or (pooling.get("pooling_mode_mean_tokens")
                                                         and not pooling.get("pooling_mode_cls_token")
                                                         and not pooling.get("pooling_mode_max_tokens"))
        if not mean or pooling.get("include_prompt") is False:
            raise ValueError(f"{paths['Pooling']}/config.json: only mean pooling over all tokens is supported")
        if transformer is None:
            transformer = AutoModel.from_pretrained(paths["Transformer"])
        tokenizer = AutoTokenizer.from_pretrained(paths["Transformer"])
        st_config_path = os.path.join(paths["Transformer"], "sentence_bert_config.json")
        st_config = _read_json(st_config_path) if os.path.isfile(st_config_path) else {}
        max_seq_length = st_config.get("max_seq_length") or min(tokenizer.model_max_length, 512)
        if st_config.get("do_lower_case"):
            raise ValueError(f"{st_config_path}: do_lower_case is not supported")
        projection = None
        if "Dense" in paths:
            dense = _read_json(os.path.join(paths["Dense"], "config.json"))
            identity = "torch.nn.modules.linear.Identity"
            if dense.get("activation_function", identity) != identity:
                raise ValueError(f"{paths['Dense']}/config.json: only an Identity activation is supported, "
                                 f"got {dense.get('activation_function')}")
            projection = nn.Linear(dense["in_features"], dense["out_features"], bias=dense.get("bias", True))
            weights_path = os.path.join(paths["Dense"], "model.safetensors")
            if os.path.isfile(weights_path):
                state = load_file(weights_path)
            else:
                state = torch.load(os.path.join(paths["Dense"], "pytorch_model.bin"), map_location="cpu",
                                   weights_only=True)
            projection.load_state_dict({key.removeprefix("linear."): value for key, value in state.items()})
        model_config_path = os.path.join(model_dir, "config_sentence_transformers.json")
        model_config = _read_json(model_config_path) if os.path.isfile(model_config_path) else {}
        # Read by the table LocalEmbedder reads them by: TaskType names, else EmbeddingGemma's / "query", "document".
        prompts = {PROMPT_NAMES[task_type]: text
                   for task_type, text in prompts_by_task_type(model_config.get("prompts") or {}).items()}
        return cls(transformer, tokenizer, max_seq_length=max_seq_length, prompts=prompts, projection=projection,
                   default_prompt_name=model_config.get("default_prompt_name"))

    # ---- shape --------------------------------------------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        return int(self.transformer.config.hidden_size)

    @property
    def dimension(self) -> int:
        """Size of the output embedding (projection output if any)."""
        return self.projection.out_features if self.projection is not None else self.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---- forward ------------------------------------------------------------------------------------------------

    def prompt_for(self, task_type: TaskType | str | None) -> str:
        if task_type is None:
            return ""
        name = prompt_name(task_type)
        if name not in self.prompts:
            raise KeyError(f"no prompt for task type {name!r}; this model has prompts for {sorted(self.prompts)}")
        return self.prompts[name]

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_seq_length,
                              return_tensors="pt")

    def forward(self, texts: Sequence[str], task_type: TaskType | str | None = None) -> torch.Tensor:
        """Unit-length embeddings (len(texts), dimension) of `texts` behind the prompt of `task_type`."""
        prompt = self.prompt_for(task_type)
        features = self.tokenize([prompt + text for text in texts])
        features = {key: value.to(self.device) for key, value in features.items()}
        output = self.transformer(**features)
        pooled = mean_pool(output.last_hidden_state, features["attention_mask"])
        if self.projection is not None:
            pooled = self.projection(pooled)
        # Losses run in fp32 even under autocast: softmax over similarity / 0.05 is sensitive to half precision.
        return nn.functional.normalize(pooled.float(), dim=-1)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], task_type: TaskType | str | None = None, batch_size: int = 32,
               dimension: int | None = None) -> np.ndarray:
        """float32 array (len(texts), dimension or self.dimension), unit rows; Matryoshka-truncated when asked."""
        was_training = self.training
        self.eval()
        try:
            # Longest first, like sentence-transformers: batches of similar length waste less on padding.
            order = sorted(range(len(texts)), key=lambda index: -len(texts[index]))
            vectors = np.zeros((len(texts), self.dimension), dtype=np.float32)
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                vectors[chunk] = self([texts[index] for index in chunk], task_type).cpu().numpy()
        finally:
            self.train(was_training)
        if dimension is not None and dimension != self.dimension:
            vectors = truncate_and_normalize(vectors, dimension)
        return vectors

    # ---- saving -------------------------------------------------------------------------------------------------

    def save(self, model_dir: str) -> str:
        """Write a sentence-transformers directory (see the module docstring); returns `model_dir`."""
        os.makedirs(model_dir, exist_ok=True)
        self.transformer.save_pretrained(model_dir, safe_serialization=True)
        # The tokenizer's own limit travels too, so loaders that ignore sentence_bert_config.json truncate the same.
        self.tokenizer.model_max_length = self.max_seq_length
        self.tokenizer.save_pretrained(model_dir)
        _write_json(os.path.join(model_dir, "sentence_bert_config.json"),
                    {"max_seq_length": self.max_seq_length, "do_lower_case": False})
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        os.makedirs(os.path.join(model_dir, "1_Pooling"), exist_ok=True)
        _write_json(os.path.join(model_dir, "1_Pooling", "config.json"), {
            "word_embedding_dimension": self.hidden_size,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False,
            "include_prompt": True,
        })
        if self.projection is not None:
            dense_dir = os.path.join(model_dir, "2_Dense")
            os.makedirs(dense_dir, exist_ok=True)
            _write_json(os.path.join(dense_dir, "config.json"), {
                "in_features": self.projection.in_features,
                "out_features": self.projection.out_features,
                "bias": self.projection.bias is not None,
                "activation_function": "torch.nn.modules.linear.Identity",
            })
            save_file({f"linear.{key}": value.detach().cpu().contiguous()
                       for key, value in self.projection.state_dict().items()},
                      os.path.join(dense_dir, "model.safetensors"))
            modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
        index = len(modules)
        normalize_path = f"{index}_Normalize"
        os.makedirs(os.path.join(model_dir, normalize_path), exist_ok=True)
        modules.append({"idx": index, "name": str(index), "path": normalize_path,
                        "type": "sentence_transformers.models.Normalize"})
        _write_json(os.path.join(model_dir, "modules.json"), modules)
        prompts = prompts_to_save(self.prompts)
        _write_json(os.path.join(model_dir, "config_sentence_transformers.json"), {
            "__version__": {"embforge": "0.1.0", "pytorch": torch.__version__},
            "prompts": prompts,
            "default_prompt_name": self.default_prompt_name,
            "similarity_fn_name": "cosine",
        })
        return model_dir
