"""A run's exports, found and read back for its report.

Training records no export path in the run directory, so exports are found
by their `assets/model_card.json`, whose `source_run` (or `source_checkpoint`)
names the run; their signatures are read with `tf.saved_model.load`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Optional

from pipeline.reporting.status import mtime
from pipeline.serving import export

EXPORT_ROOT = "saved_models"
PROBE_EXPORT_LEVELS = 3  # also look for saved_models/ in this many parent folders of a run


@dataclasses.dataclass
class Signature:
    name: str
    inputs: list               # (name, "dtype [shape]")
    outputs: list


@dataclasses.dataclass
class ExportInfo:
    path: str
    version: Optional[int]
    created: str
    checkpoint: str
    signatures: list           # Signature
    error: str = ""


def _candidate_export_roots(model_dir: str, export_roots: Optional[Iterable[str]]) -> list[str]:
    if export_roots is not None:
        roots = list(export_roots)
    else:
        roots = [os.path.join(os.getcwd(), EXPORT_ROOT)]
        parent = os.path.dirname(os.path.realpath(model_dir))
        for _ in range(PROBE_EXPORT_LEVELS):
            roots.append(os.path.join(parent, EXPORT_ROOT))
            parent = os.path.dirname(parent)
    seen, out = set(), []
    for root in roots:
        real = os.path.realpath(os.path.expanduser(root))
        if real not in seen and os.path.isdir(real):
            seen.add(real)
            out.append(real)
    return out


def find_exports(model_dir: str, export_roots: Optional[Iterable[str]] = None) -> list[str]:
    """Export version directories whose model card names `model_dir` as its source, newest first.

    train records no export path in the run directory, so exports are found by
    their `assets/model_card.json` (`source_run`, or `source_checkpoint` inside
    the run) under `export_roots` (default: ./saved_models and saved_models/ in
    the run's parent folders).
    """
    run = os.path.realpath(model_dir)
    found = []
    for root in _candidate_export_roots(model_dir, export_roots):
        for name in sorted(os.listdir(root)):
            for version in export.list_versions(os.path.join(root, name)):
                path = os.path.join(root, name, str(version))
                card = export.read_model_card(path)
                source = card.get("source_run")
                checkpoint = card.get("source_checkpoint") or ""
                if (source and os.path.realpath(source) == run) or \
                        os.path.realpath(checkpoint).startswith(run + os.sep):
                    found.append((mtime(path) or 0.0, path))
    return [path for _, path in sorted(found, reverse=True)]


def _spec_text(spec) -> str:
    dtype = getattr(getattr(spec, "dtype", None), "name", str(getattr(spec, "dtype", "?")))
    shape = getattr(spec, "shape", None)
    dims = "?" if shape is None or shape.rank is None else \
        "[" + ", ".join("batch" if i == 0 and d is None else ("?" if d is None else str(d))
                        for i, d in enumerate(shape.as_list())) + "]"
    return f"{dtype} {dims}"


def read_export(path: str) -> ExportInfo:
    """An export's signatures, read with `tf.saved_model.load(path).signatures`."""
    card = export.read_model_card(path)
    base = os.path.basename(os.path.normpath(path))
    info = ExportInfo(path, int(base) if base.isdigit() else None, str(card.get("created", "")),
                      str(card.get("checkpoint", "")), [])
    try:
        import tensorflow as tf
        loaded = tf.saved_model.load(path)
        names = sorted(loaded.signatures.keys(), key=lambda n: (n != "serving_default", n))
        for name in names:
            fn = loaded.signatures[name]
            _, kwargs = fn.structured_input_signature
            outputs = fn.structured_outputs
            outputs = outputs if isinstance(outputs, dict) else {"output": outputs}
            info.signatures.append(Signature(
                name, [(k, _spec_text(v)) for k, v in sorted(kwargs.items())],
                [(k, _spec_text(v)) for k, v in sorted(outputs.items())]))
    except Exception as e:  # a broken export is reported, not fatal
        info.error = f"{type(e).__name__}: {e}".splitlines()[0]
    return info
