"""`LocalLLM`: a transformers causal LM on this machine, with structured output by construction.

Small local models do not follow "answer in JSON" reliably, so the JSON is not left to them: the answer is decoded
field by field, in the output model's declaration order, with the JSON skeleton written by us and only the values
written (or chosen) by the model:

    {"task": "   <- prefilled; the model writes until an unescaped quote (or a newline, which JSON strings can't hold)
    ", "relevance":  <- prefilled; then one of the allowed values, chosen by log-probability (no free text at all)

- `str`: free text, ended by the closing quote, a newline, a special token (end of turn), or the token budget.
- `Literal[...]`, `Enum`, `bool`, `int` with both bounds: each allowed value is scored as a continuation and the most
  likely one is taken (sampled in proportion to its probability when temperature > 0).
- `list[str]`: a JSON array whose items are free text as above; before each item, "another item" is weighed against
  "close the list", within the field's min/max length (at most `DEFAULT_MAX_LIST_ITEMS` when it sets none).

Which of these a field is, and the JSON text around the values, come from pure functions tested without a model
(`pipelines.clients.json_decoding`); this module runs the model.

Values are re-encoded with `json.dumps`, so the assembled answer is valid JSON whatever the model wrote; pydantic then
validates it (lengths, patterns, validators), and a violation is a failed `GenerationResult` with the raw answer kept.

`generate` writes one answer; `generate_many` writes many that share an output model together (`batched_decoding`):
shared prompt prefixes (system text, few-shot examples) run once, and one forward pass per step serves every answer
being written. Both run the same decoding logic, written once as a program of model steps (`_answer_steps`).

The packaged default (SmolLM2-135M-Instruct, Q4_1 GGUF) is dequantized once into the model cache (about 20 s on 2 busy
CPU cores with transformers 5) and loaded from there afterwards (under a second once transformers is imported).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import re
import threading
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from pipelines.clients.base import (
    LLM,
    ChatMessage,
    GenerationConfig,
    GenerationResult,
    OutputT,
    Usage,
    per_request,
)
from pipelines.clients.batched_decoding import (
    BatchDecoder,
    Feed,
    Program,
    Score,
    Step,
    Sync,
    common_prefix_length,
    supports_batching,
)
from pipelines.clients.json_decoding import (
    FieldPlan,
    decode_string_content,
    find_string_end,
    key_text,
    list_text,
    plan_fields,
)
from pipelines.clients.packaged_models import (
    ResolvedModel,
    cap_torch_threads,
    materialize_once,
    model_cache_dir,
    resolve_model,
    unavailable_error,
)
from pipelines.clients.specs import DEFAULT_LOCAL_LLM

if TYPE_CHECKING:
    import torch

#: Continuations scored per forward pass in `score` and choice fields: bounds the (batch x length x vocabulary)
#: logits tensor, about 16 x 32 x 49k floats = 100 MB for SmolLM2.
SCORE_BATCH_SIZE = 16
#: Answers `generate_many` writes at once when not told (LLMSpec.concurrency's default too): a decoding step reads
#: every weight once whatever the batch, so on 2 CPU cores a step of 8 answers costs about 2-2.5 steps of one; each
#: answer holds its own KV cache (~45 KB a token for SmolLM2, ~50 MB for a 1,000-token prompt and answer).
DEFAULT_BATCH_SIZE = 8


def render_fallback_chat(messages: Sequence[ChatMessage]) -> str:
    """Prompt for tokenizers without a chat template (base models): one `Role: text` paragraph per message."""
    turns = [f"{message.role.capitalize()}: {message.content}" for message in messages]
    return "\n\n".join([*turns, "Assistant: "])


# --- the model -------------------------------------------------------------------------------------------------------


class AnswerTooLongError(Exception):
    """A string field was still open when the token budget ran out."""


class LocalLLM(LLM):
    """A transformers causal LM (any Hub id or path; default SmolLM2-135M-Instruct from its packaged GGUF)."""

    supports_logprobs = True

    def __init__(
        self,
        model: str = DEFAULT_LOCAL_LLM,
        *,
        device: str = "cpu",
        cache_dir: str | None = None,
        torch_threads: int | None = None,
    ):
        super().__init__()
        self.torch_threads = cap_torch_threads(torch_threads)
        resolved = resolve_model(model, cache_dir)
        #: True when this construction dequantized a GGUF file (False: the cached conversion was reused).
        self.converted = False
        self.loaded_from = self._load(resolved, model_cache_dir(cache_dir), device)
        self.model_id = model
        # A Hub id was resolved to its snapshot (commit) before loading: the version cache keys were computed with.
        self.model_version = resolved.model_version
        self.device = device
        parameters = inspect.signature(self._model.forward).parameters
        # transformers 5 renamed `past_key_values` to `cache` (the old name warns, then goes away in 5.40).
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self._keeps_last_logits = "logits_to_keep" in parameters
        self._stop_ids = self._special_token_ids()
        # Padding is never attended to (masked in batched steps, after the real tokens in scoring), so any id will do.
        self._pad_id = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
        # Models whose cache is not one plain layer per block (sliding windows) answer `generate_many` one by one.
        self._batches = supports_batching(self._model.config)
        # One call at a time: torch already uses every thread it is given, and interleaved calls only thrash.
        self._lock = threading.Lock()

    # --- loading ---

    def _load(self, resolved: ResolvedModel, cache_root: Path, device: str) -> str:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        location = resolved.location
        if resolved.gguf_file:
            location = str(self._dequantized_copy(resolved, cache_root))
        local = Path(location).is_dir()
        dtype: dict[str, Any] = {}
        if device == "cpu":
            import torch
            import transformers

            # Hub checkpoints are often bfloat16, which most CPUs multiply far slower than float32.
            # (transformers 5 renamed `torch_dtype` to `dtype`.)
            dtype_argument = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
            dtype[dtype_argument] = torch.float32
        try:
            # local_files_only for folders: never ask the Hub about a path.
            self._tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local)
            self._model = AutoModelForCausalLM.from_pretrained(location, local_files_only=local, **dtype)
        except OSError as error:
            raise unavailable_error(resolved, error) from error
        self._model.to(device)
        self._model.eval()
        return location

    def _dequantized_copy(self, resolved: ResolvedModel, cache_root: Path) -> Path:
        """Dequantize a GGUF checkpoint once into `cache_root`; later constructions load the saved copy (<1 s)."""
        assert resolved.gguf_file is not None
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(resolved.gguf_file).stem).strip("-").lower()
        # The version is in the folder name so that a new package version converts beside the old one.
        slug = hashlib.sha256(f"{resolved.model_version}/{resolved.gguf_file}".encode()).hexdigest()[:10]
        target = cache_root / f"{name}-{slug}-dequantized"

        def convert(staging: Path) -> None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            kwargs: dict[str, Any] = {"gguf_file": resolved.gguf_file}
            try:
                from transformers import GgufConfig

                # transformers >= 5 keeps GGUF weights packed (not saveable) unless told to dequantize.
                kwargs["quantization_config"] = GgufConfig(dequantize=True)
            except ImportError:  # transformers 4.x always dequantizes GGUF
                pass
            tokenizer = AutoTokenizer.from_pretrained(resolved.location, gguf_file=resolved.gguf_file)
            model = AutoModelForCausalLM.from_pretrained(resolved.location, **kwargs)
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            self.converted = True

        return materialize_once(target, convert)

    def _special_token_ids(self) -> frozenset[int]:
        """Token ids that end free text: end of turn / text and every other special token (none belongs in a value)."""
        ids = set(self._tokenizer.all_special_ids)
        for source in (self._tokenizer.eos_token_id, getattr(self._model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return frozenset(ids)

    # --- public API ---

    def generate(
        self,
        messages: Sequence[ChatMessage],
        output_model: type[OutputT],
        config: GenerationConfig = GenerationConfig(),
    ) -> GenerationResult[OutputT]:
        """Constrained decoding of `output_model` (see the module docstring).

        A model answer that fails validation or runs out of tokens is a failed result; an output model with a field
        this decoder cannot produce (float, Optional, nested models, unbounded int) is a programming error: TypeError.
        """
        plans = plan_fields(output_model)
        import torch

        prompt_ids = self._encode(self._render_prompt(messages))
        with self._lock, torch.inference_mode():
            state = _DecodeState(self, prompt_ids)
            raw, error = state.run(self._answer_steps(_Answer.start(prompt_ids, config), plans))
        return self._result(output_model, prompt_ids, raw, error)

    def generate_many(
        self,
        requests: Sequence[Sequence[ChatMessage]],
        output_model: type[OutputT],
        config: GenerationConfig | Sequence[GenerationConfig] = GenerationConfig(),
        concurrency: int = DEFAULT_BATCH_SIZE,
    ) -> list[GenerationResult[OutputT]]:
        """The results `generate` gives one by one, in request order, from `concurrency` answers decoded together.

        Prompt prefixes the requests share are run once, and each decoding step is one forward pass for every answer
        being written (`batched_decoding`). Greedy answers equal `generate`'s up to floating point (a batched matrix
        product sums in another order, so a near-tie can break the other way); sampling is seeded per request as in
        `generate`, so an answer does not depend on the batch it landed in; `config` is one for all requests or one
        per request (candidates sampled with seeds of their own batch together). `concurrency` bounds memory: each
        answer being written holds its own KV cache.
        """
        plans = plan_fields(output_model)
        if not requests:
            return []
        configs = per_request(config, len(requests))
        if not self._batches:
            return [self.generate(messages, output_model, each) for messages, each in zip(requests, configs,
                                                                                        strict=True)]
        import torch

        prompts = [self._encode(self._render_prompt(messages)) for messages in requests]
        if not all(prompts):
            raise ValueError(EMPTY_PROMPT)
        decoder = BatchDecoder(self._forward, pad_id=self._pad_id, device=self.device, batch_size=concurrency,
                               score_batch_size=SCORE_BATCH_SIZE)
        programs = [self._answer_steps(_Answer.start(prompt_ids, each), plans)
                    for prompt_ids, each in zip(prompts, configs, strict=True)]
        with self._lock, torch.inference_mode():
            outcomes = decoder.run(prompts, programs)
        return [
            self._result(output_model, prompt_ids, raw, error)
            for prompt_ids, (raw, error) in zip(prompts, outcomes, strict=True)
        ]

    def score(self, messages: Sequence[ChatMessage], continuations: Sequence[str]) -> list[float]:
        """Natural-log probability of each continuation as the start of the assistant's answer to `messages`.

        The end-of-turn token is not included, so "Yes" and "Yes, because ..." are both scored as answers beginning
        that way; the prompt is computed once and the continuations in batches of `SCORE_BATCH_SIZE`.
        """
        if not continuations:
            return []
        import torch

        prompt = self._render_prompt(messages)
        with self._lock, torch.inference_mode():
            prefix_ids, suffixes = self._split_continuations(prompt, [prompt + text for text in continuations])
            prefix = _DecodeState(self, prefix_ids)
            scores = self._continuation_logprobs(prefix.cache, prefix.logits, suffixes)
        tokens = len(prefix_ids) + sum(len(suffix) for suffix in suffixes)
        self.stats.record(usage=Usage(input_tokens=tokens))
        return scores

    def close(self) -> None:
        self._model = None  # type: ignore[assignment] - drop the weights; the client is unusable afterwards

    def _result(
        self, output_model: type[OutputT], prompt_ids: list[int], raw: str, error: str | None
    ) -> GenerationResult[OutputT]:
        """Validate a decoded answer and count it."""
        usage = Usage(input_tokens=len(prompt_ids), output_tokens=len(self._encode(raw)))
        if error is None:
            try:
                value = output_model.model_validate_json(raw)
            except ValidationError as validation_error:
                error = f"answer violates {output_model.__name__}: {validation_error}"
        if error is not None:
            self.stats.record(usage=usage, failed=True)
            return GenerationResult(ok=False, value=None, raw=raw, error=error, usage=usage)
        self.stats.record(usage=usage)
        return GenerationResult(ok=True, value=value, raw=raw, usage=usage)

    # --- decoding: one answer as a program of model steps, run alone (`_DecodeState`) or batched (`BatchDecoder`) ---

    def _render_prompt(self, messages: Sequence[ChatMessage]) -> str:
        if not getattr(self._tokenizer, "chat_template", None):
            return render_fallback_chat(messages)
        chat = [{"role": message.role, "content": message.content} for message in messages]
        return self._tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)

    def _encode(self, text: str) -> list[int]:
        # The chat template already wrote any special tokens the model expects.
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def _answer_steps(self, answer: _Answer, plans: Sequence[FieldPlan]) -> Program:
        """Assemble the answer field by field, asking the model through steps (`Sync`, `Feed`, `Score`) that whoever
        runs the program answers; returns (raw JSON text, error or None)."""
        text = ""
        for index, plan in enumerate(plans):
            text += key_text(index, plan.key)
            try:
                if plan.kind == "choice":
                    # What follows the value is scored with it: the tokenizer merges a closing quote with it (`",`),
                    # and scoring a lone `"` would rank options by an unnatural split.
                    after = "," if index + 1 < len(plans) else "}"
                    options = [" " + choice for choice in plan.choices]
                    text += options[(yield from self._choose(answer, text, options, after))]
                elif plan.kind == "string":
                    text += " " + (yield from self._free_string(answer, text + ' "'))
                else:
                    text += " " + (yield from self._string_list(answer, text, plan))
            except AnswerTooLongError as cut:
                return str(cut), f"answer cut at max_output_tokens={answer.config.max_output_tokens}"
        return text + "}", None

    def _choose(
        self, answer: _Answer, text: str, options: Sequence[str], after: str = ""
    ) -> Generator[Step, Any, int]:
        """Index of the option most likely to follow `text` (sampled by probability when temperature > 0)."""
        import torch

        text_ids, suffixes = self._split_continuations(text, [text + option + after for option in options])
        scores = yield Score(answer.prompt_ids + text_ids, suffixes)
        if answer.config.temperature <= 0:
            return max(range(len(options)), key=scores.__getitem__)
        weights = torch.softmax(torch.tensor(scores) / answer.config.temperature, dim=0)
        return int(torch.multinomial(weights, 1, generator=answer.generator))

    def _free_string(self, answer: _Answer, prefilled: str) -> Generator[Step, Any, str]:
        """Generate the content of the JSON string opened at the end of `prefilled`; return it JSON-encoded."""
        import torch

        logits = yield Sync(answer.prompt_ids + self._encode(prefilled))
        generated: list[int] = []
        text = ""
        while True:
            if answer.config.temperature <= 0:
                token = int(torch.argmax(logits))
            else:
                probabilities = torch.softmax(logits.float() / answer.config.temperature, dim=-1)
                token = int(torch.multinomial(probabilities, 1, generator=answer.generator))
            if token in self._stop_ids:
                break
            generated.append(token)
            answer.remaining_tokens -= 1
            text = self._tokenizer.decode(generated)
            end = find_string_end(text)
            if end is not None:
                text = text[:end]
                break
            if answer.remaining_tokens <= 0:
                raise AnswerTooLongError(prefilled + text)
            logits = yield Feed(token)
        return json.dumps(decode_string_content(text), ensure_ascii=False)

    def _string_list(self, answer: _Answer, text: str, plan: FieldPlan) -> Generator[Step, Any, str]:
        """A JSON array of free-text strings; before each item, "another item" is weighed against "close the list"."""
        items: list[str] = []
        while len(items) < plan.max_items:
            so_far = text + " " + list_text(items)[:-1]
            opener = ', "' if items else '"'
            if len(items) >= plan.min_items and (yield from self._choose(answer, so_far, [opener, "]"])) == 1:
                break
            items.append((yield from self._free_string(answer, so_far + opener)))
        return list_text(items)

    # --- scoring ---

    def _split_continuations(self, prefix: str, full_texts: Sequence[str]) -> tuple[list[int], list[list[int]]]:
        """Tokenize each full text; return the token prefix they all share with `prefix`, and each one's remainder.

        Scoring from the shortest shared prefix keeps options comparable when one merges with the prefix's last token
        and another does not.
        """
        prefix_ids = self._encode(prefix)
        fulls = [self._encode(text) for text in full_texts]
        shared = min([len(prefix_ids), *(common_prefix_length(prefix_ids, full) for full in fulls)])
        return prefix_ids[:shared], [full[shared:] for full in fulls]

    def _continuation_logprobs(
        self, cache: Any, last_logits: torch.Tensor, suffixes: Sequence[list[int]]
    ) -> list[float]:
        """Sum of log-probabilities of each suffix after the cached prefix; one forward pass per batch of suffixes.

        `cache` is copied, never changed, so the caller's decoding state stays valid.
        """
        import torch

        scores: list[float] = []
        first = torch.log_softmax(last_logits.float(), dim=-1)
        for start in range(0, len(suffixes), SCORE_BATCH_SIZE):
            batch = suffixes[start : start + SCORE_BATCH_SIZE]
            longest = max(len(suffix) for suffix in batch)
            following = None
            if longest > 1:
                # Right padding: pads come after each row's real tokens, and causal attention keeps them out of view.
                rows = [suffix + [self._pad_id] * (longest - len(suffix)) for suffix in batch]
                ids = torch.tensor(rows, device=self.device)
                batch_cache = copy.deepcopy(cache)
                batch_cache.batch_repeat_interleave(len(batch))
                following = torch.log_softmax(self._forward(ids[:, :-1], batch_cache).float(), dim=-1)
            for row, suffix in enumerate(batch):
                total = float(first[suffix[0]]) if suffix else 0.0
                if len(suffix) > 1 and following is not None:
                    targets = torch.tensor(suffix[1:], device=following.device)
                    total += float(following[row, : len(suffix) - 1].gather(-1, targets[:, None]).sum())
                scores.append(total)
        return scores

    def _forward(
        self,
        ids: torch.Tensor,
        cache: Any,
        logits_at: Sequence[int] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One forward pass of `ids` after `cache`: the logits at chunk positions `logits_at` only (None: all); the
        mask and positions are for `BatchDecoder`'s padded rows."""
        import torch

        kwargs: dict[str, Any] = {self._cache_argument: cache, "use_cache": True}
        if attention_mask is not None:
            kwargs.update(attention_mask=attention_mask, position_ids=position_ids)
        if logits_at is not None and self._keeps_last_logits:
            # Skips the vocabulary projection for every other position (~10% of a prompt's compute): an int keeps the
            # last positions, a tensor picks positions.
            last = list(logits_at) == [ids.shape[1] - 1]
            kwargs["logits_to_keep"] = 1 if last else torch.tensor(list(logits_at), device=ids.device)
        logits = self._model(input_ids=ids, **kwargs).logits
        if logits_at is not None and not self._keeps_last_logits:
            logits = logits[:, list(logits_at)]
        return logits

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        if "config" in inspect.signature(DynamicCache.__init__).parameters:
            return DynamicCache(config=self._model.config)
        return DynamicCache()


#: A prompt of no tokens leaves nothing to take the first logits from.
EMPTY_PROMPT = "the prompt is empty: there is nothing to condition the answer on"


@dataclass
class _Answer:
    """What one answer's decoding keeps besides the model: its prompt, settings, random generator and budget."""

    prompt_ids: list[int]
    config: GenerationConfig
    generator: torch.Generator | None
    #: Free-text tokens left for this answer, shared by all its string values.
    remaining_tokens: int

    @classmethod
    def start(cls, prompt_ids: list[int], config: GenerationConfig) -> _Answer:
        generator = None
        if config.temperature > 0:
            import torch

            # Seeded per answer, never the global RNG; without a seed the prompt picks it, so the same request samples
            # the same answer (what the content-addressed cache assumes), alone or in any batch.
            seed = config.seed if config.seed is not None else _seed_from(prompt_ids)
            generator = torch.Generator().manual_seed(seed)
        return cls(list(prompt_ids), config, generator, config.max_output_tokens)


class _DecodeState:
    """One sequence decoded alone: token ids fed so far, their KV cache, the logits for the next token.

    `sync` moves to new ids by keeping the longest shared prefix and feeding only the rest: re-tokenizing the
    canonical answer after each value costs a token or two, not the whole prompt.
    """

    def __init__(self, llm: LocalLLM, prompt_ids: list[int]):
        if not prompt_ids:
            raise ValueError(EMPTY_PROMPT)
        self._llm = llm
        self.ids: list[int] = []
        self.cache = llm._new_cache()
        self.logits: torch.Tensor = self._forward(list(prompt_ids))

    def run(self, program: Program) -> Any:
        """Answer each step of `program` with this sequence; returns the program's outcome."""
        reply = None
        while True:
            try:
                step = program.send(reply)
            except StopIteration as finished:
                return finished.value
            if isinstance(step, Feed):
                self.feed([step.token])
                reply = self.logits
            else:
                self.sync(step.target)
                reply = self.logits
                if isinstance(step, Score):
                    reply = self._llm._continuation_logprobs(self.cache, self.logits, step.suffixes)

    def _forward(self, ids: list[int]) -> torch.Tensor:
        import torch

        logits = self._llm._forward(torch.tensor([ids], device=self._llm.device), self.cache, [len(ids) - 1])
        self.ids.extend(ids)
        return logits[0, -1]

    def feed(self, ids: list[int]) -> None:
        if ids:
            self.logits = self._forward(ids)

    def sync(self, target: list[int]) -> None:
        # At least one token is re-fed: the logits after the kept prefix are not stored.
        keep = min(common_prefix_length(self.ids, target), len(target) - 1)
        if keep < len(self.ids):
            self.cache.crop(-(len(self.ids) - keep))  # a negative count works on transformers 4.x and 5.x
            del self.ids[keep:]
        self.feed(target[keep:])


def _seed_from(ids: Sequence[int]) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(list(ids)).encode()).digest()[:8], "big")
