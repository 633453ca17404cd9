"""Where a `keras_hub:<preset>` comes from: resolving the preset offline-first, and its provenance.

keras-hub's `from_preset` accepts preset names (Kaggle), `kaggle://` and
`hf://` handles and local directories. Offline it is slow and misleading
(`hf://` retries for ~25 s, then says "has no config.json"), so this module
resolves a preset *before* keras-hub sees it:

  * a local directory (keras-hub's `save_to_preset` format, or the Hugging
    Face timm / transformers layout: `config.json` + `model.safetensors`) is
    used as it is;
  * a remote preset already in its cache (kagglehub's `KAGGLEHUB_CACHE`, the
    Hugging Face hub cache) is read from the cache directory, with no network;
  * otherwise the host must be reachable (`hub_io.check_reachable`, seconds)
    before keras-hub downloads into that cache.
Every failure is one `WeightsError` sentence naming the preset, the cache and
the offline way (a local preset directory).

kagglehub, huggingface_hub and keras_hub are imported inside the functions
that need them: importing `pipeline.models` must not import keras-hub.
"""
from __future__ import annotations

import dataclasses
import difflib
import glob
import hashlib
import json
import os
from typing import Optional

from pipeline.errors import short_reason
from pipeline.models import hub_io
from pipeline.models.hub_io import WeightsError

KAGGLE = "kaggle://"
HF = "hf://"
CONFIG = "config.json"
# Weight files of the three layouts keras-hub reads (single file or shards).
WEIGHT_PATTERNS = ("model.weights.h5", "model_*.weights.h5", "model.safetensors",
                   "model-*-of-*.safetensors")
WEIGHT_INDEXES = ("model.weights.json", "model.safetensors.index.json")
DEFAULT_KAGGLE_ENDPOINT = "https://api.kaggle.com"


@dataclasses.dataclass(frozen=True)
class PresetSource:
    """A resolved preset.

    Attributes:
      preset: what the user wrote after `keras_hub:`.
      location: what keras-hub's `from_preset` is given (a local directory, or
        the remote handle when it is not cached yet).
      kind: "local", "kaggle" or "hf".
      handle: the remote handle (`kaggle://...`, `hf://...`), None for local dirs.
      directory: a local directory holding the preset's files, None until downloaded.
      version: the Kaggle version or the Hugging Face revision (commit) where known.
    """

    preset: str
    location: str
    kind: str
    handle: Optional[str] = None
    directory: Optional[str] = None
    version: Optional[str] = None


# --------------------------------------------------------------------------- caches and messages

def kaggle_cache_dir() -> str:
    """kagglehub's cache folder (`KAGGLEHUB_CACHE`, else ~/.cache/kagglehub)."""
    try:
        from kagglehub.config import get_cache_folder  # lazy: kagglehub
        return get_cache_folder()
    except ImportError:  # pragma: no cover - kagglehub comes with keras-hub
        return os.environ.get("KAGGLEHUB_CACHE", os.path.expanduser("~/.cache/kagglehub"))


def hf_cache_dir() -> str:
    """The Hugging Face hub cache (`HF_HUB_CACHE`, else `$HF_HOME/hub`)."""
    try:
        from huggingface_hub import constants  # lazy: huggingface_hub
        return constants.HF_HUB_CACHE
    except ImportError:  # pragma: no cover
        return os.environ.get("HF_HUB_CACHE", os.path.expanduser("~/.cache/huggingface/hub"))


def _caches(kind: Optional[str]) -> str:
    kaggle = f"the Kaggle cache KAGGLEHUB_CACHE, now {kaggle_cache_dir()}"
    hf = f"the Hugging Face cache HF_HUB_CACHE, now {hf_cache_dir()}"
    return {"kaggle": kaggle, "hf": hf}.get(kind, f"{kaggle}, or {hf}")


def preset_error(preset: str, reason: str, kind: Optional[str] = None) -> WeightsError:
    """The one-sentence error for a preset that cannot be used (`kind` "kaggle"/"hf" names its cache)."""
    return WeightsError(
        f"Cannot load keras-hub preset {preset!r} ({reason}); download it once while online "
        f"(into {_caches(kind)}), or work offline with --model=keras_hub:<local preset "
        f"directory> (keras-hub's save_to_preset format, or config.json + model.safetensors of "
        f"a Hugging Face timm model); --weights=none still needs the preset's config.json, "
        f"cached or local.")


def _require_reachable(preset: str, url: str, kind: str, timeout: float) -> None:
    try:
        hub_io.check_reachable(url, timeout)
    except WeightsError:
        host = url.split("://", 1)[-1].split("/", 1)[0]
        raise preset_error(preset, f"it is not cached and {host} is unreachable", kind) from None


# --------------------------------------------------------------------------- local directories

def weight_files(directory: str) -> list[str]:
    """The weight files (and shard indexes) of a preset directory, sorted, as paths."""
    found = set()
    for pattern in WEIGHT_PATTERNS + WEIGHT_INDEXES:
        found.update(glob.glob(os.path.join(glob.escape(directory), pattern)))
    return sorted(found)


def preset_format(directory: str) -> str:
    """"keras_hub", "timm" or "transformers", from the directory's config.json (as keras-hub infers it)."""
    with open(os.path.join(directory, CONFIG), encoding="utf-8") as f:
        config = json.load(f)
    if "registered_name" in config:
        return "keras_hub"
    if "model_type" in config:
        return "transformers"
    if "architecture" in config:
        return "timm"
    raise ValueError("config.json is neither keras-hub's (registered_name), timm's "
                     "(architecture) nor transformers' (model_type)")


def _local(preset: str, path: str) -> PresetSource:
    directory = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(os.path.join(directory, CONFIG)):
        raise preset_error(preset, f"the directory {directory} has no {CONFIG}")
    try:
        preset_format(directory)
    except (ValueError, OSError) as err:
        raise preset_error(preset, short_reason(err)) from None
    return PresetSource(preset, directory, "local", directory=directory)


def _complete(directory: str, extra: tuple = ()) -> bool:
    """A cached preset directory with its config, weights and `extra` files."""
    return (os.path.isfile(os.path.join(directory, CONFIG)) and bool(weight_files(directory))
            and all(os.path.isfile(os.path.join(directory, name)) for name in extra))


# --------------------------------------------------------------------------- Hugging Face

def _hf_snapshot(repo: str) -> Optional[str]:
    """The cached snapshot directory of `repo`'s main revision, if config and weights are there."""
    from huggingface_hub import try_to_load_from_cache  # lazy
    config = try_to_load_from_cache(repo, CONFIG)
    if not isinstance(config, str):
        return None
    directory = os.path.dirname(config)
    return directory if _complete(directory) else None


def _hf(preset: str, timeout: float) -> PresetSource:
    repo = preset[len(HF):].strip("/")
    if repo.count("/") != 1:
        raise preset_error(preset, "a Hugging Face handle has the form hf://<owner>/<model>", "hf")
    directory = _hf_snapshot(repo)
    if directory is not None:
        return PresetSource(preset, directory, "hf", handle=f"{HF}{repo}", directory=directory,
                            version=os.path.basename(directory))
    from huggingface_hub import constants  # lazy
    _require_reachable(preset, constants.ENDPOINT, "hf", timeout)
    return PresetSource(preset, f"{HF}{repo}", "hf", handle=f"{HF}{repo}")


# --------------------------------------------------------------------------- Kaggle

def builtin_presets() -> dict:
    """keras-hub's built-in presets (name -> metadata with `kaggle_handle`); imports keras_hub."""
    import keras_hub  # lazy: ~1 s and ~900 Keras registrations
    return keras_hub.models.Backbone.presets


def _kaggle_endpoint() -> str:
    try:
        from kagglesdk.kaggle_env import get_endpoint, get_env  # lazy
        return get_endpoint(get_env())
    except Exception:  # noqa: BLE001 - kagglesdk missing or an unknown environment
        return DEFAULT_KAGGLE_ENDPOINT


def kaggle_cache_path(handle: str) -> Optional[str]:
    """Where kagglehub caches a versioned `kaggle://owner/model/framework/variation/version`.

    kagglehub's documented layout: `<KAGGLEHUB_CACHE>/models/<owner>/<model>/
    <framework>/<variation>/<version>/`; None for an unversioned handle (its
    latest version needs the network).
    """
    parts = handle[len(KAGGLE):].strip("/").split("/")
    if len(parts) != 5:
        return None
    return os.path.join(kaggle_cache_dir(), "models", *parts)


def _kaggle(preset: str, handle: str, timeout: float) -> PresetSource:
    parts = handle[len(KAGGLE):].strip("/").split("/")
    if len(parts) not in (4, 5):
        raise preset_error(preset, "a Kaggle handle has the form "
                                   "kaggle://<owner>/<model>/keras/<variation>[/<version>]", "kaggle")
    version = parts[4] if len(parts) == 5 else None
    directory = kaggle_cache_path(handle)
    # keras-hub reads the image converter too; a partial cache goes to the network.
    if directory is not None and _complete(directory, ("image_converter.json",)):
        return PresetSource(preset, directory, "kaggle", handle=handle, directory=directory,
                            version=version)
    _require_reachable(preset, _kaggle_endpoint(), "kaggle", timeout)
    return PresetSource(preset, handle, "kaggle", handle=handle, version=version)


def _named(preset: str, timeout: float) -> PresetSource:
    presets = builtin_presets()
    if preset not in presets:
        close = difflib.get_close_matches(preset, list(presets), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}" if close else ""
        raise preset_error(preset, f"not a keras-hub {keras_hub_version()} preset name, "
                                   f"kaggle:// or hf:// handle, nor an existing directory{hint}")
    return _kaggle(preset, presets[preset]["kaggle_handle"], timeout)


def keras_hub_version() -> str:
    """The installed keras-hub's version, read without importing it."""
    from importlib import metadata
    try:
        return metadata.version("keras-hub")
    except metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


def resolve(preset: str, *, timeout: float = hub_io.DEFAULT_CONNECT_TIMEOUT) -> PresetSource:
    """Resolve `preset` offline-first (see the module docstring).

    Raises:
      WeightsError: no such directory, unknown name, malformed handle, or not
        cached and the host unreachable (within `timeout` seconds).
    """
    preset = os.fspath(preset).strip() if preset is not None else ""
    if not preset:
        raise preset_error(preset, "the preset is empty")
    if preset.startswith(HF):
        return _hf(preset, timeout)
    if preset.startswith(KAGGLE):
        return _kaggle(preset, preset, timeout)
    if os.path.isdir(os.path.expanduser(preset)):
        return _local(preset, preset)
    if os.sep in preset or preset.startswith((".", "~")):
        raise preset_error(preset, "no such local preset directory")
    return _named(preset, timeout)


# --------------------------------------------------------------------------- provenance

def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _downloaded(source: PresetSource) -> PresetSource:
    """`source` with its directory filled in once keras-hub has downloaded it."""
    if source.directory is not None or source.handle is None:
        return source
    if source.kind == "kaggle":
        directory = kaggle_cache_path(source.handle)
        found = directory if directory and _complete(directory) else None
    else:
        found = _hf_snapshot(source.handle[len(HF):])
    if found is None:
        return source
    version = source.version or (os.path.basename(found) if source.kind == "hf" else None)
    return dataclasses.replace(source, directory=found, version=version)


def provenance(*, argument: str, weights: Optional[str]) -> Optional[dict]:
    """Where a `keras_hub:<argument>` model's weights came from, for the run summary and model card.

    Records the preset as given, the remote handle, the Kaggle version or the
    Hugging Face revision (the cached snapshot's commit) and a sha256 of every
    weight file. None for random initialization (`weights` None). What cannot
    be known (a preset not in any cache: no files to hash) is said in `note`.
    """
    if weights is None:
        return None
    record = {"source": "keras_hub", "preset": argument, "weights": weights}
    try:
        source = _downloaded(resolve(argument, timeout=2.0))
    except WeightsError as err:
        record["note"] = str(err)
        return record
    record.update(kind=source.kind, handle=source.handle, directory=source.directory,
                  keras_hub_version=keras_hub_version())
    if source.kind == "kaggle":
        record["kaggle_version"] = source.version
    elif source.kind == "hf":
        record["hf_revision"] = source.version
    if source.directory is None:
        record["sha256"] = None
        record["note"] = "the preset's files are not in the local cache, so they have no checksum"
        return record
    record["format"] = preset_format(source.directory)
    record["sha256"] = {os.path.basename(p): sha256_file(p) for p in weight_files(source.directory)}
    return record
