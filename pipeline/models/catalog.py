"""What a user can pass as `--model`: every registered model and the keras-hub image presets.

The library side of `python -m pipeline.list_models`. keras-hub is imported
here only, inside `keras_hub_presets` (importing it costs ~1 s and registers
~900 objects with Keras, which no other verb should pay for). Everything is
read offline: the preset metadata (parameter count, family, description)
ships inside keras-hub, and a preset's image size comes from its cached
config when it has been downloaded once, else from its metadata.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from typing import Optional

from pipeline.models import keras_hub_source as source_lib
from pipeline.models import registry

# Image backbones keras-hub has no ImageClassifier for (pooled and headed by our `keras_hub:` models).
BACKBONE_ONLY_CLASSES = ("DINOV2Backbone", "DINOV3Backbone")
# Where a cached keras-hub preset states its input size: (file, keys down to the size).
_SIZE_SOURCES = (("image_converter.json", ("config", "image_size")),
                 ("preprocessor.json", ("config", "image_converter", "config", "image_size")),
                 ("config.json", ("config", "image_shape")))
# The metadata states a size only in its description: "... at a 224x224 resolution".
_DESCRIBED_SIZE = re.compile(r"\b(\d+)x\1\b")


@dataclasses.dataclass(frozen=True)
class PresetInfo:
    """A keras-hub image preset (use it as `--model=keras_hub:<name>`).

    Attributes:
      name: the preset name.
      family: keras-hub's model family (the metadata's `path`: resnet, vit, ...).
      params: parameter count of the preset's backbone, from its metadata.
      image_size: its input size when its cached config or its metadata says, else None.
      handle: where keras-hub downloads it from (a `kaggle://` handle).
    """

    name: str
    family: str
    params: Optional[int]
    image_size: Optional[int]
    handle: str


def _dig(config, keys):
    for key in keys:
        if not isinstance(config, dict) or key not in config:
            return None
        config = config[key]
    return config


def cached_preset_file(handle: str, filename: str) -> Optional[str]:
    """`filename` of a `kaggle://` preset if kagglehub's cache holds it, else None (never downloads).

    The cache layout is `keras_hub_source.kaggle_cache_path`'s (the one place it
    is written); tests/test_list_models.py writes a file where kagglehub would
    and fails loudly if the layout moves.
    """
    directory = source_lib.kaggle_cache_path(handle) if handle.startswith(source_lib.KAGGLE) else None
    path = os.path.join(directory, filename) if directory else None
    return path if path and os.path.isfile(path) else None


def preset_image_size(handle: str, description: str) -> Optional[int]:
    """The preset's input size: its cached config's (what `from_preset` will use), else its description's."""
    for filename, keys in _SIZE_SOURCES:
        path = cached_preset_file(handle, filename)
        if path is None:
            continue
        try:
            with open(path, encoding="utf-8") as f:
                size = _dig(json.load(f), keys)
        except (OSError, ValueError):
            continue
        if isinstance(size, (list, tuple)) and size and isinstance(size[0], int):
            return int(size[0])
    match = _DESCRIBED_SIZE.search(description or "")
    return int(match.group(1)) if match else None


def keras_hub_presets(family: Optional[str] = None) -> dict[str, list[PresetInfo]]:
    """The image presets this keras-hub knows, by family (sorted), each sorted by size then name.

    Image presets are those of `keras_hub.models.ImageClassifier` (every
    family with a classifier) and of the image backbones without one
    (`BACKBONE_ONLY_CLASSES`).
    """
    import keras_hub
    presets = dict(keras_hub.models.ImageClassifier.presets)
    for class_name in BACKBONE_ONLY_CLASSES:
        presets.update(getattr(keras_hub.models, class_name).presets)
    grouped: dict[str, list[PresetInfo]] = {}
    for name, preset in presets.items():
        metadata = preset.get("metadata", {})
        info = PresetInfo(name=name, family=metadata.get("path", "other"), params=metadata.get("params"),
                          image_size=preset_image_size(preset.get("kaggle_handle", ""),
                                                       metadata.get("description", "")),
                          handle=preset.get("kaggle_handle", ""))
        if family is None or info.family == family:
            grouped.setdefault(info.family, []).append(info)
    return {f: sorted(rows, key=lambda r: (r.params or 0, r.name)) for f, rows in sorted(grouped.items())}


def check_family(family: Optional[str], preset_families) -> None:
    """Refuse a family that neither the registry nor keras-hub has, naming the close ones."""
    known = {spec.family for spec in registry.list_specs()} | set(preset_families)
    if family is None or family in known:
        return
    close = difflib.get_close_matches(family, sorted(known), n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(f"Unknown model family {family!r}.{hint} Families: {', '.join(sorted(known))}")


def _table(header, rows) -> list[str]:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    return ["  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
            for row in [header, *rows]]


def _prefixes(family):
    # A prefix's spec is reached the public way: by a name that uses it.
    return [p + "<argument>" for p in registry.list_prefixes()
            if family is None or registry.get_spec(p + "<argument>").family == family]


def model_catalog(family: Optional[str] = None) -> str:
    """The text `pipeline.list_models` prints: registered models, then keras-hub presets by family.

    Raises:
      ValueError: `family` is neither a registered family nor a keras-hub one.
    """
    all_presets = keras_hub_presets()
    check_family(family, all_presets)
    presets = {f: rows for f, rows in all_presets.items() if family is None or f == family}
    specs = sorted(registry.list_specs(family), key=lambda s: (s.family, s.depth or 0, s.name))
    lines = [f"Registered models ({len(specs)}; --model=<name>):"]
    if specs:
        lines += _table(("name", "family", "depth", "image size", "default weights"),
                        [(s.name, s.family, s.depth or "-", s.default_image_size, s.default_weights or "-")
                         for s in specs])
    prefixes = _prefixes(family)
    if prefixes:
        lines.append(f"  and {', '.join(prefixes)}")
    count = sum(len(rows) for rows in presets.values())
    lines += ["", f"keras-hub {source_lib.keras_hub_version()} image presets ({count}; --model=keras_hub:<preset>):"]
    for name, rows in presets.items():
        lines.append(f"{name} ({len(rows)})")
        lines += _table(("preset", "params", "image size"),
                        [(r.name, f"{r.params:,}" if r.params else "-", r.image_size or "-") for r in rows])
    return "\n".join(lines)
