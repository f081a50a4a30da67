"""Several constrained answers decoded together: shared prompt prefixes run once, one forward pass per step for all.

`LocalLLM` writes an answer as a program of model steps (see its module docstring for the JSON skeleton):

- `Sync(target)`: make the tokens fed so far equal `target`, keeping the longest prefix already fed (a re-tokenized
  answer usually differs in its last token or two); reply: the next-token logits.
- `Feed(token)`: one generated token; reply: the next-token logits.
- `Score(target, suffixes)`: `Sync(target)`, then reply with the log-probability of each suffix after it.

Alone (`LocalLLM.generate`), each step is a forward pass of one sequence. `BatchDecoder` runs the programs of many
requests that share an output model (what `pipelines.llm_calls.call_many` hands `generate_many`):

1. Shared prefixes run once. The requests of a stage share a long token prefix: the chat template and system text,
   and per query type the few-shot examples. `plan_prefix_tree` finds the prefixes worth sharing (the branch points of
   the prompts' token trie); each is run once, at batch size 1, from its parent's KV cache, and every prompt under it
   starts from a copy, so only its own suffix (the passage) goes through the model.
2. Continuous batching. Up to `batch_size` answers are written at once. A request that joins gets its prompt's KV
   cache (shared prefix + its own suffix, at batch size 1, so no compute is spent on padding) and takes a row of one
   batched cache. Each round, every row makes one step: the tokens all rows feed go through one forward pass, the
   continuations of choice fields through another. A finished answer leaves and the next request takes its row.
3. Layout. A row's tokens sit in its cache columns in order, with masked gaps: re-tokenizing an answer masks the
   columns it drops (one row of a rectangular cache cannot be cropped alone), and a row that feeds fewer tokens in a
   round than another leaves masked columns after its own. The attention mask hides the gaps and explicit position ids
   count only a row's real tokens, so each row computes what it would alone. A joining request takes a finished row's
   place in the cache where it is; the whole cache is packed again (every row's tokens moved to its first columns)
   only when the batch grows or shrinks or gaps fill a quarter of it, so the gaps never add up.

Equal answers, up to floating point: a prompt's logits are bitwise those of `generate` (a prefix run apart from its
suffix sums in the same order), but a batched step multiplies several rows at once, which MKL sums in another order
than one row (gemm vs gemv): logits differ in the last digits, and a greedy pick can differ only at a near-tie
(`benchmarks/local_llm_speed.py` counts how often answers differ).
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: Fewest tokens a shared prefix must add to its parent to be run on its own. Running a prefix apart costs one forward
#: pass at batch size 1 (about one decoding step); a few shared tokens are cheaper run again inside each suffix.
MIN_SHARED_PREFIX_TOKENS = 32


# --- what an answer asks of the model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sync:
    """Make the tokens fed so far `target` (at least its last token is fed again); reply: the next-token logits."""

    target: list[int]


@dataclass(frozen=True)
class Feed:
    """Feed one more token; reply: the next-token logits."""

    token: int


@dataclass(frozen=True)
class Score:
    """`Sync(target)`, then reply with the log-probability of each suffix (token ids) following it."""

    target: list[int]
    suffixes: list[list[int]]


Step = Sync | Feed | Score
#: An answer being written: yields steps, is sent each step's reply, returns its outcome.
Program = Generator[Step, Any, Any]


def common_prefix_length(left: Sequence[int], right: Sequence[int]) -> int:
    length = 0
    for a, b in zip(left, right, strict=False):
        if a != b:
            break
        length += 1
    return length


# --- which prefixes to share: pure, tested without a model ------------------------------------------------------------


@dataclass(frozen=True)
class PrefixNode:
    """Prompt tokens [start, end) that every prompt in `rows` has, after its parent's tokens [0, start)."""

    start: int
    end: int
    #: Index of the parent node in the plan (its `end` is this node's `start`); None: starts at the first token.
    parent: int | None
    rows: tuple[int, ...]


def plan_prefix_tree(
    prompts: Sequence[Sequence[int]], min_tokens: int = MIN_SHARED_PREFIX_TOKENS
) -> tuple[list[PrefixNode], list[int | None]]:
    """The prefixes worth running once: where two or more prompts share at least `min_tokens` tokens more than the
    prefix they branch from, as a tree (a prefix of a longer shared prefix is its parent).

    Returns the nodes, parents before children, and for each prompt the deepest node it starts from (None: it shares
    nothing worth reusing). No node holds a prompt's last token, so each prompt still runs at least one token of its
    own, whose logits start its answer.
    """
    nodes: list[PrefixNode] = []
    deepest: list[int | None] = [None] * len(prompts)

    def split(rows: Sequence[int], depth: int, parent: int | None) -> None:
        # `rows` share their first `depth` tokens; those not past their last token at `depth` branch no further.
        by_next: dict[int, list[int]] = {}
        for row in rows:
            if len(prompts[row]) - 1 > depth:
                by_next.setdefault(prompts[row][depth], []).append(row)
        for group in by_next.values():
            if len(group) < 2:
                continue
            end = min(len(prompts[row]) - 1 for row in group)
            first = prompts[group[0]]
            for position in range(depth + 1, end):
                if any(prompts[row][position] != first[position] for row in group[1:]):
                    end = position
                    break
            start = nodes[parent].end if parent is not None else 0
            node = parent
            if end - start >= min_tokens:
                nodes.append(PrefixNode(start, end, parent, tuple(group)))
                node = len(nodes) - 1
                for row in group:
                    deepest[row] = node
            split(group, end, node)

    split(range(len(prompts)), 0, None)
    return nodes, deepest


# --- the model's cache, grown in place -------------------------------------------------------------------------------


#: (keys, values) per layer, each [rows, kv heads, columns, head dim].
KV = list[tuple["torch.Tensor", "torch.Tensor"]]


def supports_batching(model_config: Any) -> bool:
    """Whether the model's cache is one plain layer per block (no sliding windows, which count columns, not tokens),
    on a transformers whose caches are made of layers (>= 4.56)."""
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return False
    try:
        layers = DynamicCache(config=model_config).layers
    except TypeError:  # no `config` argument: before layered caches
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


@functools.cache
def _growing_layer() -> type:
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A DynamicLayer that writes new columns into spare room, instead of concatenating (copying the whole layer,
        every row) at each step; `keys`/`values` are views of the filled part."""

        @classmethod
        def holding(cls, keys: torch.Tensor, values: torch.Tensor) -> GrowingLayer:
            layer = cls()
            layer.lazy_initialization(keys, values)
            # No spare room: the first update moves to a new buffer, so `keys` and `values` are never written to.
            layer.keys, layer.values, layer._rooms = keys, values, (keys, values)
            return layer

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self._rooms = None
            length = self.keys.shape[-2] if self._rooms is not None else 0
            end = length + key_states.shape[-2]
            if self._rooms is None or end > self._rooms[0].shape[-2]:
                # A quarter spare (at least 64 columns): amortized, a layer is copied a few times per answer.
                capacity = end + max(end // 4, 64)
                rooms = []
                for old, new in ((self.keys, key_states), (self.values, value_states)):
                    room = new.new_empty(*new.shape[:-2], capacity, new.shape[-1])
                    if length:
                        room[..., :length, :] = old
                    rooms.append(room)
                self._rooms = tuple(rooms)
            self._rooms[0][..., length:end, :] = key_states
            self._rooms[1][..., length:end, :] = value_states
            self.keys, self.values = self._rooms[0][..., :end, :], self._rooms[1][..., :end, :]
            return self.keys, self.values

    return GrowingLayer


def growing_cache(kv: KV | None = None) -> Any:
    """A model cache that starts from `kv` (not copied; its updates never write into it) and grows in place."""
    from transformers import DynamicCache

    layer = _growing_layer()
    cache = DynamicCache()
    cache.layer_class_to_replicate = layer
    if kv:
        cache.layers = [layer.holding(keys, values) for keys, values in kv]
    return cache


def cache_tensors(cache: Any) -> KV:
    return [(layer.keys, layer.values) for layer in cache.layers]


# --- the batched decoder ----------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Row:
    """One answer in the batch."""

    index: int
    program: Program
    #: Tokens fed so far, in order, and the cache column of each (increasing; the columns between are masked).
    ids: list[int]
    columns: list[int]
    logits: torch.Tensor
    step: Step | None = None
    outcome: Any = None
    done: bool = False


@dataclass
class _SharedPrefixes:
    """The KV caches of a plan's prefix nodes: each run once when a row first needs it, dropped after its last row."""

    nodes: list[PrefixNode]
    run: Callable[[list[int], KV | None], KV]
    _users: dict[int, int] = field(default_factory=dict)
    _caches: dict[int, KV] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._users = {index: len(node.rows) for index, node in enumerate(self.nodes)}

    def take(self, node: int | None, prompt: list[int]) -> KV | None:
        """The KV cache of `node`, run (with its ancestors) if not yet, for one of its rows; counts that row served."""
        if node is None:
            return None
        cache = self._cache(node, prompt)
        ancestor: int | None = node
        while ancestor is not None:
            self._users[ancestor] -= 1
            if self._users[ancestor] == 0:
                del self._caches[ancestor]
            ancestor = self.nodes[ancestor].parent
        return cache

    def _cache(self, node: int, prompt: list[int]) -> KV:
        if node not in self._caches:
            spec = self.nodes[node]
            parent = self._cache(spec.parent, prompt) if spec.parent is not None else None
            self._caches[node] = self.run(prompt[spec.start : spec.end], parent)
        return self._caches[node]


class _Batch:
    """The answers being written and their one cache: row i of the cache and of `mask` is `rows[i]`'s."""

    def __init__(self, device: str):
        self.rows: list[_Row] = []
        self.cache: Any = None
        #: [rows, columns]: True where a row has a token.
        self.mask: torch.Tensor | None = None
        self._device = device

    @property
    def columns(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def sparse(self) -> bool:
        """Whether gaps are more than a quarter of the columns the rows attend over (each gap costs as a token)."""
        return sum(len(row.columns) for row in self.rows) < 0.75 * len(self.rows) * self.columns

    def place(self, position: int, row: _Row, kv: KV) -> None:
        """Put a joining row where a finished one was: its prompt's cache in the first columns, the rest masked."""
        import torch

        length = len(row.columns)
        if length > self.columns:
            self._widen(length - self.columns)
        for layer, (keys, values) in zip(self.cache.layers, kv, strict=True):
            layer.keys[position, :, :length] = keys[0]
            layer.values[position, :, :length] = values[0]
        assert self.mask is not None
        self.mask[position] = torch.arange(self.columns, device=self._device) < length
        self.rows[position] = row

    def _widen(self, extra: int) -> None:
        """`extra` more columns for every row, masked (zeros, so that no attention kernel ever meets a NaN there)."""
        import torch

        for index, layer in enumerate(self.cache.layers):
            zeros = layer.keys.new_zeros(*layer.keys.shape[:2], extra, layer.keys.shape[3])
            self.cache.update(zeros, zeros, index)
        assert self.mask is not None
        self.mask = torch.cat([self.mask, self.mask.new_zeros(len(self.rows), extra)], dim=1)

    def pack(self, joining: list[tuple[_Row, KV]]) -> None:
        """Rebuild the cache for the unfinished rows, then `joining`, each row's tokens moved to its first columns."""
        import torch

        kept = [(position, row) for position, row in enumerate(self.rows) if not row.done]
        rows = [row for _, row in kept] + [row for row, _ in joining]
        self.rows = rows
        if not rows:
            self.cache = self.mask = None
            return
        lengths = [len(row.columns) for row in rows]
        width = max(lengths)
        old = cache_tensors(self.cache) if kept else []
        if kept:
            # New column c of a kept row is its old column columns[c]; past its length, column 0 again (masked).
            sources = torch.zeros(len(kept), width, dtype=torch.long, device=self._device)
            for line, (_, row) in enumerate(kept):
                sources[line, : len(row.columns)] = torch.tensor(row.columns, device=self._device)
            select = torch.tensor([position for position, _ in kept], device=self._device)
        packed: KV = []
        for layer in range(len(old) if kept else len(joining[0][1])):
            pair = []
            for part in (0, 1):
                pieces = []
                if kept:
                    chosen = old[layer][part].index_select(0, select)
                    index = sources[:, None, :, None].expand(-1, chosen.shape[1], -1, chosen.shape[3])
                    pieces.append(chosen.gather(2, index))
                for _, row_kv in joining:
                    tensor = row_kv[layer][part]
                    pieces.append(torch.nn.functional.pad(tensor, (0, 0, 0, width - tensor.shape[2])))
                pair.append(torch.cat(pieces) if len(pieces) > 1 else pieces[0])
            packed.append((pair[0], pair[1]))
        for row in rows:
            row.columns = list(range(len(row.columns)))
        self.cache = growing_cache(packed)
        self.mask = (torch.arange(width, device=self._device)[None, :]
                     < torch.tensor(lengths, device=self._device)[:, None])


class BatchDecoder:
    """Runs the step programs of many answers, `batch_size` at a time, with shared prompt prefixes run once.

    `forward(ids, cache, logits_at, attention_mask=None, position_ids=None)` runs the model on `ids` [rows, width]
    after `cache` and returns the logits at chunk positions `logits_at` ([rows, len(logits_at), vocabulary]; None:
    every position). Without a mask it is the plain causal case of one sequence.
    """

    def __init__(
        self,
        forward: Callable[..., torch.Tensor],
        *,
        pad_id: int,
        device: str,
        batch_size: int,
        score_batch_size: int,
        min_prefix_tokens: int = MIN_SHARED_PREFIX_TOKENS,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._forward = forward
        self._pad = pad_id
        self._device = device
        self._batch_size = batch_size
        self._score_batch_size = score_batch_size
        self._min_prefix_tokens = min_prefix_tokens

    def run(self, prompts: Sequence[list[int]], programs: Sequence[Program]) -> list[Any]:
        """Each program's outcome, in the order given. Prompts join in token order, so that those sharing a prefix are
        decoded together and a shared prefix's cache is dropped soon after it was made."""
        nodes, deepest = plan_prefix_tree(prompts, self._min_prefix_tokens)
        prefixes = _SharedPrefixes(nodes, self._run_prefix)
        waiting = deque(sorted(range(len(prompts)), key=lambda index: prompts[index]))
        outcomes: list[Any] = [None] * len(prompts)

        def next_row() -> tuple[_Row, KV] | None:
            while waiting:
                index = waiting.popleft()
                prefix = prefixes.take(deepest[index], prompts[index])
                row, kv = self._join(index, prompts[index], programs[index], prefix)
                if not row.done:
                    return row, kv
                outcomes[index] = row.outcome
            return None

        batch = _Batch(self._device)
        while True:
            # A finished answer's row goes to the next request in place; only rows left over (joining or leaving) or
            # too many gaps make the whole cache be packed again.
            for position, row in enumerate(batch.rows):
                if row.done:
                    outcomes[row.index] = row.outcome
                    joined = next_row() if waiting else None
                    if joined is not None:
                        batch.place(position, *joined)
            joining = []
            while waiting and len(batch.rows) + len(joining) < self._batch_size:
                joined = next_row()
                if joined is not None:
                    joining.append(joined)
            if joining or any(row.done for row in batch.rows) or (batch.rows and batch.sparse()):
                batch.pack(joining)
            if not batch.rows:
                return outcomes
            self._round(batch)

    # --- rows joining ---

    def _run_prefix(self, tokens: list[int], parent: KV | None) -> KV:
        import torch

        cache = growing_cache(parent)
        self._forward(torch.tensor([tokens], device=self._device), cache, [len(tokens) - 1])
        return cache_tensors(cache)

    def _join(self, index: int, prompt: list[int], program: Program, prefix: KV | None) -> tuple[_Row, KV]:
        """A new request's row: its prompt's cache (shared prefix + its own suffix, alone) and its first step."""
        import torch

        start = prefix[0][0].shape[-2] if prefix else 0
        cache = growing_cache(prefix)
        own = prompt[start:]
        logits = self._forward(torch.tensor([own], device=self._device), cache, [len(own) - 1])[0, -1]
        row = _Row(index, program, ids=list(prompt), columns=list(range(len(prompt))), logits=logits)
        self._advance(row, None)
        return row, cache_tensors(cache)

    # --- one round: every row makes one step ---

    def _round(self, batch: _Batch) -> None:
        """Feed every row's tokens in one forward pass, score the choices asked for, and send each row its reply."""
        import torch

        rows, mask = batch.rows, batch.mask
        assert mask is not None
        fed: list[list[int]] = []
        for line, row in enumerate(rows):
            step = row.step
            if isinstance(step, Feed):
                fed.append([step.token])
                continue
            assert step is not None
            # As `_DecodeState.sync`: keep the longest prefix already fed, but feed at least one token (the logits
            # after the kept prefix are not stored). What is dropped is masked, not cropped.
            keep = min(common_prefix_length(row.ids, step.target), len(step.target) - 1)
            if keep < len(row.ids):
                mask[line, row.columns[keep:]] = False
                del row.ids[keep:], row.columns[keep:]
            fed.append(step.target[keep:])
        columns = mask.shape[1]
        width = max(len(tokens) for tokens in fed)
        ids = torch.tensor([tokens + [self._pad] * (width - len(tokens)) for tokens in fed], device=self._device)
        # Padding goes after a row's own tokens, so every query position sees at least one real token (a row that sees
        # none turns into NaN in some attention kernels).
        chunk = torch.tensor([[True] * len(tokens) + [False] * (width - len(tokens)) for tokens in fed],
                             device=self._device)
        positions = torch.tensor([[len(row.ids) + offset for offset in range(width)] for row in rows],
                                 device=self._device)
        batch.mask = mask = torch.cat([mask, chunk], dim=1)
        wanted = sorted({len(tokens) - 1 for tokens in fed})
        logits = self._forward(ids, batch.cache, wanted, attention_mask=mask, position_ids=positions)
        for line, (row, tokens) in enumerate(zip(rows, fed, strict=True)):
            row.logits = logits[line, wanted.index(len(tokens) - 1)]
            row.columns.extend(range(columns, columns + len(tokens)))
            row.ids.extend(tokens)
        scores = self._score(batch)
        for line, row in enumerate(rows):
            self._advance(row, scores[line] if isinstance(row.step, Score) else row.logits)

    def _score(self, batch: _Batch) -> dict[int, list[float]]:
        """Each Score row's suffix log-probabilities, as `LocalLLM._continuation_logprobs`: the first token from the
        row's logits, the rest from one forward pass per `score_batch_size` suffixes on copies of their rows."""
        import torch

        rows, mask = batch.rows, batch.mask
        assert mask is not None
        scores: dict[int, list[float]] = {}
        longer: list[tuple[int, int, list[int]]] = []
        for line, row in enumerate(rows):
            if isinstance(row.step, Score):
                first = torch.log_softmax(row.logits.float(), dim=-1)
                scores[line] = [float(first[suffix[0]]) if suffix else 0.0 for suffix in row.step.suffixes]
                longer += [(line, which, suffix) for which, suffix in enumerate(row.step.suffixes) if len(suffix) > 1]
        kv = cache_tensors(batch.cache) if longer else []
        for start in range(0, len(longer), self._score_batch_size):
            group = longer[start : start + self._score_batch_size]
            width = max(len(suffix) - 1 for _, _, suffix in group)
            select = torch.tensor([line for line, _, _ in group], device=self._device)
            copies = growing_cache([(keys.index_select(0, select), values.index_select(0, select))
                                    for keys, values in kv])
            ids = torch.tensor([suffix[:-1] + [self._pad] * (width + 1 - len(suffix)) for _, _, suffix in group],
                               device=self._device)
            chunk = torch.tensor([[True] * (len(suffix) - 1) + [False] * (width + 1 - len(suffix))
                                  for _, _, suffix in group], device=self._device)
            positions = torch.tensor([[len(rows[line].ids) + offset for offset in range(width)]
                                      for line, _, _ in group], device=self._device)
            attention = torch.cat([mask.index_select(0, select), chunk], dim=1)
            following = torch.log_softmax(
                self._forward(ids, copies, None, attention_mask=attention, position_ids=positions).float(), dim=-1)
            for position, (line, which, suffix) in enumerate(group):
                targets = torch.tensor(suffix[1:], device=following.device)
                scores[line][which] += float(following[position, : len(suffix) - 1].gather(-1, targets[:, None]).sum())
        return scores

    @staticmethod
    def _advance(row: _Row, reply: Any) -> None:
        try:
            row.step = row.program.send(reply)
        except StopIteration as finished:
            row.step, row.outcome, row.done = None, finished.value, True
