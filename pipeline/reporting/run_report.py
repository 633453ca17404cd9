"""One run's lab report: `<run>/report.md` and a self-contained `<run>/report.html`.

It holds: the command line that repeats the run, the data and its split
sizes, the model with its parameter count and a compact layer summary,
precision / strategy / device, the hyperparameters (config.json), the epoch
table (metrics.csv), best epoch, test accuracy and per-class accuracy, the
training curves, the learning-rate plot and the confusion matrix (PNGs in
`<run>/plots/`, linked from the markdown, inline in the HTML), and for
exported runs the export path and its signatures. The numbers come from
`run_data.collect_run`; a run's unfinished state is shown, not refused.
"""
from __future__ import annotations

import collections
import os
from typing import Iterable, Optional

from pipeline import rundir
from pipeline.reporting.document import (Code, Details, Document, Facts, Image, Para, Row, Section, Table,
                                         count, duration, lr_text, num, pct)
from pipeline.reporting import deploy_section, mistakes
from pipeline.reporting.render import render_html, render_markdown
from pipeline.reporting.run_data import RunData, collect_run
from pipeline.reporting.settings import flag_settings, setting_text
from pipeline.reporting import timing

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
LAYER_ROWS = 6          # layer summary: first and last rows shown when the model is longer

_OPTIMIZER_SETTINGS = {"optimizer", "learning_rate", "momentum", "nesterov", "weight_decay", "schedule",
                       "lr_boundaries", "lr_decay", "warmup_epochs", "switch_optimizer_epoch",
                       "backbone_lr_multiplier", "layer_decay"}


def _hyperparameter_tables(config: dict) -> list:
    """config.json as tables of flag names: data, model, optimizer and schedule, the rest of training."""
    groups = {"Data": flag_settings({"data": config.get("data") or {}}),
              "Model": flag_settings({"model": config.get("model") or {}})}
    train = flag_settings({"train": config.get("train") or {}})
    groups["Optimizer and schedule"] = {k: v for k, v in train.items()
                                        if k in _OPTIMIZER_SETTINGS or k.startswith("second_")}
    groups["Training"] = {k: v for k, v in train.items() if k not in groups["Optimizer and schedule"]}
    blocks, unset = [], []
    for title, values in groups.items():
        rows = []
        for key, value in values.items():
            if value is None:
                unset.append(key)
            else:
                rows.append([("code", key), setting_text(value)])
        if rows:
            blocks.append(Table(["setting", "value"], rows, "ll", caption=title))
    if unset:
        blocks.append(Para(["Unset (the model's or the data's own default): "
                            + ", ".join(sorted(set(unset))) + "."], "note"))
    return blocks


def _layer_blocks(data: RunData) -> list:
    params = data.summary.get("parameters")
    parts = [("b", data.summary.get("model") or (data.config.get("model") or {}).get("name", "?")), ": ",
             ("b", count(params)), " parameters"]
    if data.trainable_params is not None and params:
        parts.append(f" ({count(data.trainable_params)} trainable, "
                     f"{count(int(params) - data.trainable_params)} non-trainable)")
    blocks = [Para(parts + ["."])]
    if not data.layers:
        blocks.append(Para([f"Layer summary unavailable: {data.layer_error or 'model not loaded'}."], "note"))
        return blocks
    layers = data.layers
    counts = collections.Counter(layer.kind for layer in layers)
    count_table = Table(["type", "layers"], [[k, str(n)] for k, n in counts.most_common()], "lr",
                        caption=f"{len(layers)} layers by type")

    def row(layer):
        return [layer.index, ("code", layer.name), layer.kind, ("code", layer.output_shape)]

    headers = ["#", "layer", "type", "output shape"]
    if len(layers) <= 2 * LAYER_ROWS + 2:
        blocks += [Table(headers, [row(x) for x in layers], "rlll", caption="layers"), count_table]
        return blocks
    hidden = len(layers) - 2 * LAYER_ROWS
    rows = [row(x) for x in layers[:LAYER_ROWS]] + [["…", f"… {hidden} more layers …", "", ""]] + \
           [row(x) for x in layers[-LAYER_ROWS:]]
    blocks += [Table(headers, rows, "rlll", caption=f"first and last {LAYER_ROWS} layers"), count_table]
    every = f"python -m pipeline.visualize --model_dir={data.model_dir} --list_layers"
    full = Table(headers, [row(x) for x in layers], "rlll", scroll=True)
    blocks.append(Details(f"All {len(layers)} layers", [full], markdown_note=["Every layer: ", ("code", every), "."]))
    return blocks


def _epoch_table(data: RunData) -> Table:
    has_val = any(r.get("val_accuracy") is not None for r in data.metrics)
    headers = ["epoch", "loss", "accuracy"] + (["val_loss", "val_accuracy"] if has_val else []) + ["lr", "time"]
    rows, best = [], set()
    for i, r in enumerate(data.metrics):
        cells = [str(r["epoch"]), num(r.get("loss")), pct(r.get("accuracy"))]
        if has_val:
            cells += [num(r.get("val_loss")), pct(r.get("val_accuracy"))]
        cells += [lr_text(r.get("lr")), duration(r.get("epoch_seconds"))]
        if r["epoch"] == data.best_epoch:
            best.add(i)
            cells[0] = f"{r['epoch']} (best)"
        rows.append(cells)
    return Table(headers, rows, "r" * len(headers), frozenset(best), scroll=len(rows) > 30)


def _figure(data: RunData, kind: str, alt: str, base_dir: str) -> list:
    if kind in data.figures:
        path = data.figures[kind]
        return [Image(path, os.path.relpath(path, base_dir).replace(os.sep, "/"), alt)]
    if kind in data.figure_notes:
        return [Para([f"No {alt.lower()}: {data.figure_notes[kind]}"], "note")]
    return []


def _test_blocks(data: RunData, confusion: list) -> list:
    t, summary = data.test, data.summary
    blocks = []
    if summary.get("split_sizes") and not (summary["split_sizes"].get("test")) and not t.available:
        return [Para([t.reason], "warn")]
    if t.accuracy is not None:
        blocks.append(Para(["Test accuracy ", ("b", pct(t.accuracy)),
                            f" (loss {num(t.loss)}) on {count(t.examples)} images, best checkpoint "
                            f"(epoch {data.best_epoch})."]))
    if not t.available:
        blocks.append(Para([t.reason], "note"))
        return blocks
    names = t.class_names or list(t.per_class)
    rows, worst = [], None
    for i, name in enumerate(names):
        acc = t.per_class.get(name)
        row = t.confusion[i] if t.confusion is not None and i < len(t.confusion) else []
        total = sum(row)
        wrong = [(n, names[j]) for j, n in enumerate(row) if j != i and n]
        confused = max(wrong)[1] if wrong else "–"
        confused_n = max(wrong)[0] if wrong else 0
        rows.append([("code", name), pct(acc), count(total),
                     f"{confused} ({confused_n} image{'s' * (confused_n != 1)})" if wrong else "–"])
        if acc is not None and (worst is None or acc < worst[1]):
            worst = (i, acc)
    per_class = Table(["class", "accuracy", "test images", "most often mistaken for"], rows, "lrrl",
                      frozenset([worst[0]]) if worst else frozenset(),
                      caption="Per-class accuracy (the lowest highlighted)", scroll=len(rows) > 40)
    blocks += [Row([per_class] + confusion), Para([t.reason + "."], "note")]
    return blocks


def _export_blocks(data: RunData) -> list:
    if not data.exports:
        return [Para(["Not exported (no SavedModel under the export folders searched names this run as "
                      "its source). Export it with ", ("code", f"python -m pipeline.export "
                                                               f"--model_dir={data.model_dir}"), "."], "note")]
    blocks = []
    for info in data.exports:
        blocks.append(Para(["Export ", ("code", info.path),
                            f" (version {info.version}, {info.checkpoint or 'best'} checkpoint"
                            + (f", created {info.created}" if info.created else "") + "). Serve it with "
                            "TF Serving (tag serve)."]))
        if info.error:
            blocks.append(Para([f"Its signatures could not be read: {info.error}"], "warn"))
            continue
        rows = []
        for sig in info.signatures:
            rows.append([("code", sig.name),
                         "; ".join(f"{n}: {s}" for n, s in sig.inputs) or "–",
                         "; ".join(f"{n}: {s}" for n, s in sig.outputs) or "–"])
        if rows:
            blocks.append(Table(["signature", "inputs", "outputs"], rows, "lll"))
    return blocks


def _facts(data: RunData) -> Facts:
    s, status = data.summary, data.status
    sizes = s.get("split_sizes") or {}
    wall = s.get("wall_seconds") if status.kind in ("completed", "diverged") else None
    if wall is None and data.metrics:
        wall_text = "≥ " + duration(sum(r.get("epoch_seconds") or 0 for r in data.metrics))
    else:
        wall_text = duration(wall)
    best_text = pct(data.best_value) if data.monitor == "val_accuracy" else "– (no validation split)"
    test_text = pct(data.test.accuracy) if data.test.accuracy is not None else (
        "no test split" if "test" in sizes and not sizes.get("test") else "–")
    return Facts([
        ("Status", status.kind, f"{status.epochs_done} epochs"),
        ("Test accuracy", test_text, "best checkpoint"),
        ("Best val_accuracy", best_text, f"epoch {data.best_epoch}" if data.best_epoch else ""),
        ("Parameters", count(s.get("parameters")), s.get("model") or ""),
        ("Wall time", wall_text, "training, all phases"),
        *([("Peak memory", f"{s['peak_rss_mb']:.0f} MiB", "resident, whole process"  # issue 19
            + "".join(f"; {k} {v:.0f} MiB" for k, v in (s.get("peak_device_memory_mb") or {}).items()))]
          if s.get("peak_rss_mb") else []),
    ])


def _reproduce_blocks(data: RunData) -> list:
    if data.command:
        return [Para(["Repeat this run (a new run directory; add ", ("code", "--model_dir=..."),
                      " to choose it):"]), Code(data.command)]
    return [Para(["No flags.cfg: this run was not started from the command line, so there is "
                  "no flagfile that repeats it; config.json below holds its settings."], "note")]


def _data_blocks(data: RunData, dataset: str) -> list:
    s = data.summary
    sizes = s.get("split_sizes") or {}
    split_rows = [[name, count(sizes.get(name))] for name in ("train", "val", "test") if name in sizes]
    blocks = [Para(["Dataset ", ("code", str(dataset)), f": {count(s.get('num_classes'))} classes, "
                    f"images {s.get('image_size', '?')}x{s.get('image_size', '?')}."])]
    if split_rows:
        blocks.append(Table(["split", "images"], split_rows, "lr"))
    if "test" in sizes and not sizes.get("test"):
        blocks.append(Para(["No test split."], "warn"))
    return blocks


def _data_report_link(data: RunData, base_dir: str) -> list:
    """A link to `<run>/data_report/data_report.md` (the data checks of a folder), with its warning count."""
    report_md = os.path.join(data.model_dir, "data_report", "data_report.md")
    if not os.path.exists(report_md):
        return []
    warnings = (rundir.read_json(os.path.join(data.model_dir, "data_report", "data_report.json")) or {}
                ).get("warnings") or []
    href = os.path.relpath(report_md, base_dir).replace(os.sep, "/")
    return [Para(["Data checks (class counts, sizes, duplicates across splits, EXIF rotations): ",
                  ("link", "data_report.md", href), f" ({len(warnings)} warning(s))."],
                 "warn" if warnings else "")]


def _hardware_table(summary: dict) -> Table:
    s = summary
    rows = [["precision", ("code", str(s.get("precision", "?")))],
            ["strategy", ("code", str(s.get("strategy", "?")))]]
    rows += [[label, setting_text(s[key])] for key, label in (
        ("replicas", "replicas"), ("workers", "workers"), ("per_replica_batch", "per-replica batch"),
        ("lr_scaling", "learning-rate scaling")) if s.get(key) is not None]
    rows += [["device", str(s.get("device", "?"))],
             ["TensorFlow / Keras", f"{s.get('tensorflow', '?')} / {s.get('keras', '?')}"]]
    return Table(["", ""], rows, "ll")


def _training_blocks(data: RunData, base_dir: str) -> list:
    lr_figure = _figure(data, "lr", "Learning-rate schedule", base_dir)
    if data.metrics:
        best = [f"Best epoch {data.best_epoch} of {data.status.epochs_done}"]
        if data.monitor == "val_accuracy":
            best.append(f" (val_accuracy {pct(data.best_value)})")
        else:
            best.append(f" (chosen by training accuracy {pct(data.best_value)}: no validation split)")
        blocks = [Para([("b", "".join(best)), "."]), Row([_epoch_table(data)] + lr_figure)]
    else:
        blocks = [Para(["No finished epoch: metrics.csv is empty or missing."], "warn")] + lr_figure
    blocks += timing.time_blocks(data.summary, data.config)  # estimate vs actual, --time_budget's choice
    return blocks + _figure(data, "curves", "Training curves", base_dir)


def run_document(data: RunData, base_dir: Optional[str] = None) -> Document:
    """The run report as blocks (`base_dir`: where the markdown file lives, for image links)."""
    base_dir = base_dir or data.model_dir
    s, status = data.summary, data.status
    dataset = s.get("dataset") or (data.config.get("data") or {}).get("dataset", "?")
    lead = [] if status.kind == "completed" else [
        Para(["Status: ", ("b", status.text)], "warn" if status.kind in ("interrupted", "diverged") else "")]
    confusion = _figure(data, "confusion", "Confusion matrix", base_dir)
    sections = [
        Section("Reproduce", "reproduce", _reproduce_blocks(data)),
        Section("Data", "data", _data_blocks(data, dataset) + _data_report_link(data, base_dir)),
        Section("Model", "model", _layer_blocks(data)),
        Section("Precision, strategy and device", "hardware", [_hardware_table(s)]),
        Section("Hyperparameters", "hyperparameters", _hyperparameter_tables(data.config)),
        Section("Training", "training", _training_blocks(data, base_dir)),
        Section("Test results", "test", _test_blocks(data, confusion)),
        # The mistakes: per-class P/R/F1, highest-loss images, calibration, TTA, class counts.
        *mistakes.mistakes_sections(data.model_dir, data.test.evaluation, data.figures, base_dir),
        Section("Export", "export", _export_blocks(data)),
        *deploy_section.deploy_sections(data.model_dir, base_dir),  # ONNX/LiteRT, calibration, rejection
    ]
    subtitle = f"{s.get('model', '?')} on {dataset} · {data.model_dir}"
    return Document(f"Run report: {data.name}", subtitle, status.kind, status.kind, _facts(data), sections, lead)


def write_run_report(model_dir: str, *, export_roots: Optional[Iterable[str]] = None,
                     evaluate: bool = True, load_model: bool = True,
                     read_signatures: bool = True) -> tuple[str, str]:
    """Write `<run>/report.md`, `<run>/report.html` and `<run>/plots/*.png`; returns (md, html) paths.

    Raises:
      rundir.RunDirError: `model_dir` is missing or not a run directory.
    """
    data = collect_run(model_dir, export_roots=export_roots, evaluate=evaluate, load_model=load_model,
                       read_signatures=read_signatures)
    document = run_document(data, model_dir)
    md = rundir.path(model_dir, REPORT_MD)
    page = rundir.path(model_dir, REPORT_HTML)
    rundir.write_text_atomic(md, render_markdown(document))
    rundir.write_text_atomic(page, render_html(document))
    return md, page
