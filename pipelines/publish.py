"""`embforge publish`: upload a run's shards as a Hub dataset, or a trained student as a sentence-transformers model.

Dataset: one config per record kind (`triplets`, `pairs`, `classification`, `passages`; `rejected` only when asked),
declared in the README's YAML `configs:` so `datasets.load_dataset(repo_id, "triplets")` reads exactly that kind's
shards. The card is written from `manifest.json`: what was generated from what, per-stage counts and rejection
reasons, pass rates, mining statistics, cache hits, tokens and estimated cost.

Model: the sentence-transformers folder, with a card holding the evaluation table (`report.json` from
`embforge evaluate`) and the training configuration (`train_config.json` beside the model folder).

Re-publishing is cheap and safe:
  - files whose content the repo already holds (sha256 for LFS files, git blob id for small ones) are not sent, and
    when nothing differs no commit is made at all ("no changes");
  - an interrupted upload can simply be run again: LFS objects already stored are skipped by the Hub, and the commit
    that makes them visible is atomic, so the repo never shows half a run.

Paths are read through Beam's `FileSystems`, as `embforge generate` and `embforge evaluate` write them: a run
directory, a model folder or a report on gs://, s3:// or any registered filesystem publishes like a local one. Files
are streamed in chunks for hashing and upload, never held whole in memory.

The token comes from `HF_TOKEN` or the huggingface_hub login; it goes to huggingface_hub only, never to a log or file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from typing import IO, Any

import yaml
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipelines.config_loading import ConfigError
from pipelines.run_layout import shard_paths, shard_rows

LOGGER = logging.getLogger(__name__)

#: Record kinds published as dataset configs, in card order; `rejected` only with include_rejected.
DATASET_KINDS = ("triplets", "pairs", "classification", "passages")
REJECTED_KIND = "rejected"
#: The split every config exposes: a run is one body of training data, not a train/test partition.
SPLIT = "train"
DEFAULT_LICENSE = "other"
NO_CHANGES = "no changes"
_CARD = "README.md"
_MANIFEST = "manifest.json"
#: Files of a model folder that are not the model: our card replaces the old README, dotfiles are git plumbing.
_MODEL_SKIP_DIRS = ("__pycache__", "checkpoints")
_HASH_CHUNK = 1 << 20


class PublishError(ConfigError):
    """A publish that cannot start: missing folder, no token, not a model folder. The message says what to do.
    A ConfigError, so the CLI prints it as one line and exits with status 2."""


# --- paths on any Beam filesystem -----------------------------------------------------------------------------------


def _is_local(path: str) -> bool:
    return FileSystems.get_scheme(path) is None


def _open(path: str) -> IO[bytes]:
    # Uncompressed: the Hub gets the bytes as stored; AUTO would gunzip a `.gz` file on the way.
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def _is_file(path: str) -> bool:
    # Beam's exists() is also True for a local folder; object stores have files only.
    return os.path.isfile(path) if _is_local(path) else FileSystems.exists(path)


def _is_folder(path: str) -> bool:
    """A local folder; elsewhere (object stores have no folders) a path that is no file but has files below it."""
    if _is_local(path):
        return os.path.isdir(path)
    if FileSystems.exists(path):
        return False
    return bool(FileSystems.match([FileSystems.join(path, "**")], limits=[1])[0].metadata_list)


def _split(path: str) -> tuple[str, str]:
    """(parent, name) of a file or folder on any Beam filesystem; a local path is made absolute first, as
    os.path.abspath does, and a trailing "/" names the same folder."""
    return FileSystems.split(path.rstrip("/") or path)


def _match(pattern: str) -> list[str]:
    return sorted(metadata.path for result in FileSystems.match([pattern]) for metadata in result.metadata_list)


@dataclass(frozen=True)
class _RepoFile:
    path_in_repo: str
    #: A path on any Beam filesystem, or the bytes of a generated file (the card).
    source: str | bytes

    def read_chunks(self) -> Iterable[bytes]:
        if isinstance(self.source, bytes):
            yield self.source
            return
        with _open(self.source) as handle:
            while chunk := handle.read(_HASH_CHUNK):
                yield chunk

    @property
    def size(self) -> int:
        if isinstance(self.source, bytes):
            return len(self.source)
        return FileSystems.get_filesystem(self.source).size(self.source)

    def upload_source(self, stack: ExitStack) -> str | bytes | IO[bytes]:
        """What CommitOperationAdd reads: the bytes, a local path (huggingface_hub opens it), or a file of another
        filesystem opened in `stack`. huggingface_hub needs a seekable binary file object; a download that cannot
        seek is copied to a local temporary file first (on disk, not in memory: a shard may be larger than RAM)."""
        if isinstance(self.source, bytes) or _is_local(self.source):
            return self.source
        handle = stack.enter_context(_open(self.source))
        if isinstance(handle, io.BufferedIOBase) and handle.seekable():
            return handle
        spooled = stack.enter_context(tempfile.TemporaryFile())
        shutil.copyfileobj(handle, spooled, _HASH_CHUNK)
        spooled.seek(0)
        return spooled

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for chunk in self.read_chunks():
            digest.update(chunk)
        return digest.hexdigest()

    def git_blob_id(self) -> str:
        """What git (and the Hub's tree API) calls a regular file's oid: sha1 of "blob <size>\\0" + content."""
        digest = hashlib.sha1(b"blob %d\0" % self.size)
        for chunk in self.read_chunks():
            digest.update(chunk)
        return digest.hexdigest()


# --- dataset card ---------------------------------------------------------------------------------------------------


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:,.4f}".rstrip("0").rstrip(".")


def _table(header: list[str], rows: Iterable[Iterable[Any]], align: str | None = None) -> list[str]:
    """A Markdown table; `align` is one character per column, "l" or "r" (numbers right-aligned)."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    for row in rows:
        # A "|" inside a reason or stage name would split the cell.
        lines.append("| " + " | ".join(_number(cell) if isinstance(cell, (int, float)) and not isinstance(cell, bool)
                                         else str(cell).replace("|", "\\|") for cell in row) + " |")
    return lines


def _rate(numerator: int, denominator: int) -> str:
    return f"{numerator / denominator:.1%}" if denominator else "—"


def _corpus_path(manifest: Mapping[str, Any]) -> str:
    corpus = manifest.get("config", {}).get("corpus", {})
    return str(corpus.get("path", "unknown")) if isinstance(corpus, Mapping) else "unknown"


def dataset_card(manifest: Mapping[str, Any], repo_id: str, kinds: Mapping[str, str], *,
                 license: str = DEFAULT_LICENSE, rows: Mapping[str, int] | None = None) -> str:
    """README.md for a run: YAML front matter (license, one config per kind in `kinds`: kind -> data_files glob) and a
    body written from the manifest's figures. `rows`: rows published per kind (default: the manifest's outputs)."""
    default = "triplets" if "triplets" in kinds else next(iter(kinds), None)
    configs = []
    for kind, pattern in kinds.items():
        config: dict[str, Any] = {"config_name": kind, "data_files": [{"split": SPLIT, "path": pattern}]}
        if kind == default:
            config["default"] = True
        configs.append(config)
    metadata = {
        "license": license,
        "pretty_name": f"embforge run {manifest['run_id'][:8]}",
        "task_categories": ["sentence-similarity", "text-retrieval", "text-classification"],
        "tags": ["embforge", "synthetic", "embeddings", "hard-negatives"],
        "configs": configs,
    }
    rows = manifest["outputs"] if rows is None else rows
    lines = ["---", yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).rstrip("\n"), "---", "",
             f"# {repo_id}", "",
             f"Synthetic training data for text-embedding models, generated by embforge {manifest['embforge_version']} "
             f"(run `{manifest['run_id']}`, created {manifest['created_at']}).", ""]

    # 1. Provenance: what was generated from what, so a reader can judge (and reproduce) the data.
    lines += ["## Provenance", "", f"- Corpus: `{_corpus_path(manifest)}`"]
    lines += [f"- {role} model: `{model}`" for role, model in sorted(manifest["models"].items())]
    lines += [f"- Prompt `{name}`: version {version}" for name, version in sorted(manifest["prompt_versions"].items())]
    if manifest["package_versions"]:
        lines.append("- Packages: " + ", ".join(f"{name} {version}" for name, version
                                                 in sorted(manifest["package_versions"].items())))
    lines.append("")

    # 2. Contents and how to load them.
    lines += ["## Configs", ""]
    lines += _table(["config", "rows", "files"], [(kind, rows.get(kind, 0), f"`{pattern}`")
                                                 for kind, pattern in kinds.items()], "lrl")
    first = default or "triplets"
    lines += ["", "```python", "from datasets import load_dataset", "",
              f'{first} = load_dataset("{repo_id}", "{first}", split="{SPLIT}")', "```", ""]

    # 3. Where every row went: the per-stage balance, why rows were rejected, and what share passed each filter.
    lines += ["## Pipeline counts", "",
              "Pass rate = kept / (kept + rejected): the share of the rows a stage judged that it kept.", ""]
    lines += _table(["stage", "input", "expanded", "kept", "rejected", "skipped", "pass rate"],
                    [(stage["stage"], stage["input"], stage["expanded"], stage["kept"], stage["rejected"],
                      stage["skipped"], _rate(stage["kept"], stage["kept"] + stage["rejected"]))
                     for stage in manifest["stages"]])
    balance = "every stage balances" if manifest["balanced"] else "**some stage does not balance**"
    lines += ["", f"Balance (input + expanded = kept + rejected + skipped): {balance}.", ""]
    reasons = [(stage["stage"], reason, count) for stage in manifest["stages"]
               for reason, count in sorted(stage["reasons"].items(), key=lambda item: (-item[1], item[0]))]
    lines += ["### Rejection reasons", ""]
    lines += _table(["stage", "reason", "rows"], reasons, "llr") if reasons else ["No row was rejected."]
    lines.append("")

    # 4. Hard-negative mining: false negatives removed and positives relabeled are the figures that explain quality.
    mining = manifest["mining"]
    false_negatives = sum(count for name, count in mining.items()
                          if name in ("dropped.teacher_threshold", "dropped.llm_relevant"))
    lines += ["## Mining", "",
              f"- False negatives dropped: {false_negatives:,} (teacher threshold "
              f"{mining.get('dropped.teacher_threshold', 0):,}, LLM judged relevant "
              f"{mining.get('dropped.llm_relevant', 0):,})",
              f"- Positives relabeled (a mined passage fitted the query better): {mining.get('relabeled', 0):,}", ""]
    if mining:
        lines += _table(["statistic", "count"], sorted(mining.items()), "lr") + [""]

    # 5. Cost: cache hits, tokens and the estimate, so the price of a re-run (near zero) and a scale-up is visible.
    usage = manifest["llm_usage"]
    lines += ["## Cache, tokens and cost", ""]
    if manifest["cache"]:
        lines += _table(["cache counter", "count"], sorted(manifest["cache"].items()), "lr") + [""]
    if usage:
        totals = ["**total**", *(sum(row[field] for row in usage) for field in
                                 ("calls", "cache_hits", "skipped_by_budget", "input_tokens", "output_tokens"))]
        totals.append(f"{sum(row['estimated_cost_usd'] for row in usage):.4f}")
        lines += _table(["stage", "LLM calls", "cache hits", "skipped by budget", "input tokens", "output tokens",
                         "est. cost (USD)"],
                        [(row["stage"], row["calls"], row["cache_hits"], row["skipped_by_budget"], row["input_tokens"],
                          row["output_tokens"], f"{row['estimated_cost_usd']:.4f}") for row in usage] + [totals])
        lines.append("")
    else:
        lines += ["No LLM calls were recorded.", ""]
    embedding = manifest["embedding_usage"]
    if any(row["texts_embedded"] or row["cache_hits"] or row["skipped_by_budget"] for row in embedding):
        lines += _table(["stage", "texts embedded", "cache hits", "skipped by budget", "est. input tokens",
                         "est. cost (USD)"],
                        [(row["stage"], row["texts_embedded"], row["cache_hits"], row["skipped_by_budget"],
                          row["estimated_input_tokens"], f"{row['estimated_cost_usd']:.4f}") for row in embedding])
        lines.append("")
    lines += [f"Estimated cost of the run, LLM calls and teacher embeddings together: "
              f"{manifest['estimated_cost_usd']:.4f} USD (list prices; an estimate, not an invoice).", ""]
    if manifest["budget"]:
        lines += ["Budget: " + ", ".join(f"{name} = {_number(value)}"
                                         for name, value in sorted(manifest["budget"].items())) + ".", ""]

    lines += ["## License", "", f"`{license}`."]
    if license == DEFAULT_LICENSE:
        # Generated text inherits terms from the corpus and the LLM; embforge cannot know them, so it says so.
        lines[-1] += (" The terms of this data follow from the source corpus and the generating model's terms of use;"
                      " publish again with a `license` once they are known.")
    lines.append("")
    return "\n".join(lines)


# --- model card -----------------------------------------------------------------------------------------------------


def find_report(model_dir: str, report: str | None = None) -> str | None:
    """report.json for a model: `report` (the file or its folder) if given, else next to the model or in the
    `report/` folder beside the training output (`embforge run` writes <out>/student/model and <out>/report)."""
    if report is not None:
        path = FileSystems.join(report, "report.json") if _is_folder(report) else report
        if not _is_file(path):
            raise PublishError(f"{path}: no evaluation report there; run `embforge evaluate` or leave --report out")
        return path
    if _is_local(model_dir):
        model_dir = os.path.abspath(model_dir)
    parent = _split(model_dir)[0]
    for candidate in (FileSystems.join(model_dir, "report.json"),
                      FileSystems.join(parent, "report", "report.json"),
                      FileSystems.join(_split(parent)[0], "report", "report.json")):
        if _is_file(candidate):
            return candidate
    return None


def _demote_headings(markdown: str) -> str:
    return "\n".join("#" + line if line.startswith("#") else line for line in markdown.splitlines())


def model_card(repo_id: str, report: Mapping[str, Any] | None, train_config: Mapping[str, Any] | None, *,
               license: str = DEFAULT_LICENSE, dataset: str | None = None, has_plot: bool = False) -> str:
    """README.md for a model: sentence-transformers metadata, a usage snippet, the evaluation tables of `report`
    (report.json's content) and the training configuration."""
    metadata: dict[str, Any] = {
        "license": license,
        "library_name": "sentence-transformers",
        "pipeline_tag": "sentence-similarity",
        "tags": ["sentence-transformers", "feature-extraction", "sentence-similarity", "embforge"],
    }
    if dataset:
        metadata["datasets"] = [dataset]
    lines = ["---", yaml.safe_dump(metadata, sort_keys=False).rstrip("\n"), "---", "", f"# {repo_id}", "",
             "A text-embedding student trained by embforge on synthetic query–passage triplets with mined hard "
             "negatives.", "",
             "```python", "from sentence_transformers import SentenceTransformer", "",
             f'model = SentenceTransformer("{repo_id}")',
             'embeddings = model.encode(["how do I read a file?", "open() returns a file object"])', "```", ""]
    if train_config is not None:
        student = train_config.get("student")
        if student:
            lines += [f"Base model: `{student}`.", ""]
    if report is not None:
        from embedder.report import render_markdown

        # One renderer for report.md and the card, so the two tables cannot drift apart.
        # The report's own title ("# Embedding evaluation") becomes this section's heading.
        table = _demote_headings(render_markdown(report))
        if not has_plot:
            table = table.replace("\n![metrics by dimension](report.png)\n", "")
        lines += [table.rstrip("\n"), ""]
    else:
        lines += ["## Evaluation", "", "No evaluation report was published with this model.", ""]
    if train_config is not None:
        lines += ["## Training configuration", "", "```json", json.dumps(train_config, indent=2, sort_keys=True),
                  "```", ""]
    lines += ["## License", "", f"`{license}`.", ""]
    return "\n".join(lines)


# --- uploads --------------------------------------------------------------------------------------------------------


def _token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise PublishError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login`")
    return token


def _is_unchanged(local: _RepoFile, remote: Any) -> bool:
    """True when the repo's file has the same content: LFS files by sha256, small files by git blob id."""
    if remote.lfs is not None:
        return remote.lfs.sha256 == local.sha256()
    return remote.blob_id == local.git_blob_id()


def _upload(repo_id: str, repo_type: str, files: list[_RepoFile], *, private: bool, revision: str | None,
            managed_prefixes: tuple[str, ...], message: str) -> str:
    """Make the repo hold `files` (and nothing else under `managed_prefixes`) in one commit; "no changes" if it does."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(token=_token())
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    # create_repo leaves an existing repo's visibility alone; --private must not upload into a public repo. The
    # reverse is not done: publishing without --private never makes a private repo public.
    if private and not api.repo_info(repo_id, repo_type=repo_type).private:
        api.update_repo_settings(repo_id, repo_type=repo_type, private=True)
        LOGGER.warning("%s %s was public; made it private before uploading (--private)", repo_type, repo_id)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
    remote = {entry.path: entry for entry in api.list_repo_tree(repo_id, repo_type=repo_type, revision=revision,
                                                                recursive=True) if isinstance(entry, RepoFile)}
    local_paths = {file.path_in_repo for file in files}
    changed = [file for file in files if file.path_in_repo not in remote
               or not _is_unchanged(file, remote[file.path_in_repo])]
    stale = sorted(path for path in remote if path not in local_paths and path.startswith(managed_prefixes))
    LOGGER.info("%s %s: %d of %d files changed, %d stale files to delete", repo_type, repo_id, len(changed),
                len(files), len(stale))
    if not changed and not stale:
        return NO_CHANGES
    # Files of other filesystems stay open until the commit is made: huggingface_hub hashes them when the operation
    # is built and reads them again to upload.
    with ExitStack() as stack:
        operations: list[Any] = [CommitOperationAdd(path_in_repo=file.path_in_repo,
                                                    path_or_fileobj=file.upload_source(stack)) for file in changed]
        operations += [CommitOperationDelete(path_in_repo=path) for path in stale]
        info = api.create_commit(repo_id, operations, commit_message=message, repo_type=repo_type, revision=revision)
    return str(info.commit_url)


def _dataset_files(run_dir: str, include_rejected: bool) -> tuple[dict[str, list[str]], dict[str, int], dict[str, Any]]:
    """Non-empty shards per record kind, rows per kind, and the validated manifest."""
    manifest_path = FileSystems.join(run_dir, _MANIFEST)
    if not _is_file(manifest_path):
        raise PublishError(f"{manifest_path}: missing; publish a run directory written by `embforge generate`")
    from data_schemas import load_manifest

    manifest = load_manifest(manifest_path)
    kinds = DATASET_KINDS + ((REJECTED_KIND,) if include_rejected else ())
    shards: dict[str, list[str]] = {}
    rows: dict[str, int] = {}
    for kind in kinds:
        paths = shard_paths(run_dir, kind)
        # Beam's sharding can leave an empty shard; `datasets` fails on a Parquet file without rows ("BatchSize
        # must be greater than 0"), and it holds no data, so it stays home.
        counts = {path: shard_rows(path) for path in paths}
        kept = [path for path in paths if counts[path] > 0]
        if len(kept) < len(paths):
            LOGGER.info("%s: leaving out %d empty shard(s)", kind, len(paths) - len(kept))
        if kept:
            shards[kind] = kept
            rows[kind] = sum(counts.values())
    if not shards:
        raise PublishError(f"{run_dir}: no shards (<kind>/part-*.parquet) to publish")
    return shards, rows, manifest


def publish_dataset(run_dir: str, repo_id: str, *, private: bool = False, revision: str | None = None,
                    include_rejected: bool = False, license: str = DEFAULT_LICENSE) -> str:
    shards, rows, manifest = _dataset_files(run_dir, include_rejected)
    patterns = {kind: f"{kind}/part-*.parquet" for kind in shards}
    files = [_RepoFile(f"{kind}/{_split(path)[1]}", path) for kind, paths in shards.items() for path in paths]
    files.append(_RepoFile(_MANIFEST, FileSystems.join(run_dir, _MANIFEST)))
    card = dataset_card(manifest, repo_id, patterns, license=license, rows=rows)
    files.append(_RepoFile(_CARD, card.encode("utf-8")))
    # Every record-kind folder is ours: a shard the run no longer has must go, or the config's glob would read it.
    managed = tuple(f"{kind}/" for kind in (*DATASET_KINDS, REJECTED_KIND))
    return _upload(repo_id, "dataset", files, private=private, revision=revision, managed_prefixes=managed,
                   message=f"embforge publish dataset: run {manifest['run_id']}")


def _read_json(path: str | None) -> dict[str, Any] | None:
    if path is None or not _is_file(path):
        return None
    with _open(path) as handle:
        return json.loads(handle.read().decode("utf-8"))


def publish_model(model_dir: str, repo_id: str, *, private: bool = False, revision: str | None = None,
                  license: str = DEFAULT_LICENSE, report: str | None = None, dataset: str | None = None) -> str:
    if not _is_file(FileSystems.join(model_dir, "modules.json")):
        raise PublishError(f"{model_dir}: no modules.json; publish the sentence-transformers folder that "
                           "`embforge train` writes (<output_dir>/model)")
    files = []
    # Every file below the folder ("**" crosses folders), on any Beam filesystem; each matched path starts with the
    # pattern's literal part.
    pattern = FileSystems.join(model_dir, "**")
    for path in _match(pattern):
        relative = path[len(pattern) - len("**"):].replace(os.sep, "/")
        *folders, name = relative.split("/")
        if (name.startswith(".") or relative == _CARD
                or any(folder.startswith(".") or folder in _MODEL_SKIP_DIRS for folder in folders)):
            continue
        files.append(_RepoFile(relative, path))
    report_path = find_report(model_dir, report)
    evaluation = _read_json(report_path)
    has_plot = False
    if report_path is not None:
        files.append(_RepoFile("report.json", report_path))
        plot = FileSystems.join(_split(report_path)[0], "report.png")
        if _is_file(plot):
            files.append(_RepoFile("report.png", plot))
            has_plot = True
    train_config_path = FileSystems.join(_split(model_dir)[0], "train_config.json")
    train_config = _read_json(train_config_path)
    if train_config is not None:
        files.append(_RepoFile("train_config.json", train_config_path))
    card = model_card(repo_id, evaluation, train_config, license=license, dataset=dataset, has_plot=has_plot)
    files.append(_RepoFile(_CARD, card.encode("utf-8")))
    # A model repo is the model: nothing is deleted, so files a person added by hand (a notebook, a logo) survive.
    return _upload(repo_id, "model", files, private=private, revision=revision, managed_prefixes=(),
                   message=f"embforge publish model from {_split(model_dir)[1]}")


def publish(kind: str, path: str, *, repo_id: str, private: bool = False, revision: str | None = None,
            include_rejected: bool = False, license: str = DEFAULT_LICENSE, report: str | None = None) -> str:
    """Upload a run (kind "dataset") or a trained model folder (kind "model"); returns the commit URL or
    "no changes" when the repo already holds exactly these files."""
    if not _is_folder(path):
        raise PublishError(f"{path}: not a directory")
    if kind == "dataset":
        return publish_dataset(path, repo_id, private=private, revision=revision, include_rejected=include_rejected,
                               license=license)
    if kind == "model":
        return publish_model(path, repo_id, private=private, revision=revision, license=license, report=report)
    raise PublishError(f"kind {kind!r}: expected 'dataset' or 'model'")
