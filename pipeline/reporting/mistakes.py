"""The run report's view of the model's mistakes (what a person with their own photos looks at first).

Sections, all from the saved test evaluation (`pipeline.training.evaluation`:
evaluation_test.json and top_losses_test.npz) and the data report
(`<run>/data_report/data_report.json`, written by the data checks):

  Per-class precision, recall and F1   scikit-learn's, with macro-F1 and balanced accuracy
  Mistakes                             the highest-loss test images (thumbnails with true and
                                       predicted class and probability), the most-confused pairs
  Calibration                          the reliability diagram and the ECE over 15 equal-width bins
                                       (`pipeline.metrics`, the same function the export calibrates with)
  Test-time augmentation               accuracy with and without TTA
  Class counts                         images per class and split, from the data report

Why a module of its own: the run report stays the map of a run; the mistakes
are one job (read, plot, tabulate) that can grow without touching it.
Nothing here imports TensorFlow.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from pipeline import rundir
from pipeline.reporting import plots
from pipeline.reporting.document import Image, Para, Section, Table, count, num, pct

# Where the data checks put their report inside a run directory (the trainer's hook), then older places.
DATA_REPORT_FILES = (os.path.join("data_report", "data_report.json"), "data_report.json")
TOP_LOSS_COLUMNS = 4
CONFUSED_ROWS = 10


def read_data_report(model_dir: str) -> Optional[dict]:
    """The run's data report (`data_report.json`), or None when the run has none."""
    for name in DATA_REPORT_FILES:
        report = rundir.read_json(rundir.path(model_dir, name))
        if report is not None:
            return report
    return None


def read_top_loss_images(model_dir: str, split: str = "test") -> Optional[np.ndarray]:
    """The highest-loss thumbnails saved beside evaluation_<split>.json (uint8 [k, h, w, 3]), or None."""
    filename = rundir.path(model_dir, f"top_losses_{split}.npz")
    if not os.path.exists(filename):
        return None
    with np.load(filename) as saved:
        return saved["images"]


# -- figures

def top_losses_figure(images: np.ndarray, entries: list, *, title: str):
    """A grid of the highest-loss images, each titled true / predicted (probability) and its loss."""
    n = min(len(images), len(entries))
    if n == 0:
        raise ValueError("no test images were evaluated")
    cols = min(TOP_LOSS_COLUMNS, n)
    rows = -(-n // cols)
    fig = plots.new_figure(2.3 * cols, 2.5 * rows + 0.4)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, e in zip(axes, images[:n], entries[:n]):
        ax.imshow(image if image.shape[-1] == 3 else image[..., 0], cmap=None if image.shape[-1] == 3 else "gray",
                  interpolation="nearest")
        ax.set_title(f"true {e['true']}\npred {e['predicted']} ({e['probability']:.0%})\n"
                     f"p(true) {e['true_probability']:.1%}, loss {e['loss']:.2f}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def reliability_figure(reliability: dict, ece: float, *, title: str):
    """Confidence against accuracy per equal-width bin (bars), the diagonal, and the images per bin."""
    edges = np.asarray(reliability["edges"], dtype=float)
    acc = np.array([np.nan if v is None else v for v in reliability["accuracy"]], dtype=float)
    conf = np.array([np.nan if v is None else v for v in reliability["confidence"]], dtype=float)
    counts = np.asarray(reliability["count"], dtype=float)
    if counts.sum() == 0:
        raise ValueError("no test images were evaluated")
    fig = plots.new_figure(5.5, 6.0)
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    width, left = np.diff(edges), edges[:-1]
    filled = counts > 0
    top.bar(left[filled], acc[filled], width[filled], align="edge", color="#1f77b4", edgecolor="white",
            label="accuracy")
    top.bar(left[filled], np.abs(conf - acc)[filled], width[filled], bottom=np.minimum(conf, acc)[filled],
            align="edge", facecolor="none", hatch="//", edgecolor="#d62728", label="gap to confidence")
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.legend(loc="upper left", fontsize=8)
    top.set_title(f"{title}\nECE {ece:.4f} ({len(counts)} equal-width bins)")
    bottom.bar(left, counts, width, align="edge", color="#7f7f7f", edgecolor="white")
    bottom.set_xlabel("confidence (highest probability)")
    bottom.set_ylabel("images")
    bottom.set_xlim(0, 1)
    return fig


def figure_jobs(model_dir: str, name: str, evaluation: Optional[dict]) -> list:
    """(kind, filename, make) for the run report's mistakes figures (`run_data._figures` draws them)."""
    if not evaluation or "reliability" not in evaluation:
        return []
    jobs = [("reliability", "reliability_test.png", lambda: reliability_figure(
        evaluation["reliability"], evaluation["ece"], title=f"Reliability (test split): {name}"))]
    images = read_top_loss_images(model_dir)
    if images is not None and evaluation.get("top_losses"):
        jobs.append(("top_losses", "top_losses_test.png", lambda: top_losses_figure(
            images, evaluation["top_losses"], title=f"Highest-loss test images: {name}")))
    return jobs


# -- sections

def _figure(figures: dict, kind: str, alt: str, base_dir: str) -> list:
    if kind not in figures:
        return []
    path = figures[kind]
    return [Image(path, os.path.relpath(path, base_dir).replace(os.sep, "/"), alt)]


def per_class_blocks(evaluation: dict) -> list:
    rows, worst = [], None
    for i, (name, m) in enumerate(evaluation["per_class_metrics"].items()):
        rows.append([("code", name), pct(m["precision"]), pct(m["recall"]), pct(m["f1"]), count(m["support"])])
        if m["support"] and (worst is None or m["f1"] < worst[1]):
            worst = (i, m["f1"])
    return [Para(["Macro-F1 ", ("b", pct(evaluation["macro_f1"])), ", balanced accuracy ",
                  ("b", pct(evaluation["balanced_accuracy"])), f" (TTA {evaluation.get('tta', 'none')}): "
                  "every class counts alike, however few its images."]),
            Table(["class", "precision", "recall", "F1", "support"], rows, "lrrrr",
                  frozenset([worst[0]]) if worst else frozenset(),
                  caption="Per-class precision, recall and F1 (the lowest F1 highlighted)", scroll=len(rows) > 40)]


def mistakes_blocks(evaluation: dict, figures: dict, base_dir: str) -> list:
    pairs = evaluation.get("confused_pairs") or []
    blocks = _figure(figures, "top_losses", "Highest-loss test images", base_dir)
    if not blocks:
        blocks.append(Para(["No thumbnails of the highest-loss images (top_losses_test.npz is missing: "
                            "re-run pipeline.evaluate)."], "note"))
    if not pairs:
        return blocks + [Para(["No test image was misclassified."], "note")]
    rows = [[("code", p["true"]), ("code", p["predicted"]), count(p["count"]), pct(p["fraction"])]
            for p in pairs[:CONFUSED_ROWS]]
    return blocks + [Table(["true class", "predicted as", "images", "share of the true class"], rows, "llrr",
                           caption="Most-confused class pairs")]


def calibration_blocks(evaluation: dict, figures: dict, base_dir: str) -> list:
    figure = _figure(figures, "reliability", "Reliability diagram", base_dir)
    return [Para(["Expected calibration error ", ("b", num(evaluation["ece"])),
                  " over 15 equal-width confidence bins: the mean gap between how sure the model is and how "
                  "often it is right (0 = calibrated)."])] + figure


def tta_blocks(evaluation: dict) -> list:
    by_mode = evaluation.get("tta_accuracy") or {}
    if not by_mode:
        return []
    rows = [[("code", mode), pct(acc), "yes" if mode == evaluation.get("tta") else ""]
            for mode, acc in by_mode.items()]
    return [Table(["TTA", "test accuracy", "the numbers above"], rows, "lrl",
                  caption="Accuracy with and without test-time augmentation (softmax probabilities averaged)"),
            Para(["Other modes: ", ("code", "python -m pipeline.evaluate --model_dir=<run> --tta=flip_crops"),
                  "."], "note")]


def class_count_blocks(report: Optional[dict]) -> list:
    if not report or not report.get("splits"):
        return [Para(["No data report in this run (data checks run when training on a folder; "
                      "see python -m pipeline.inspect_data)."], "note")]
    splits = {s: v.get("class_counts") or {} for s, v in report["splits"].items()}
    names = list(dict.fromkeys(n for counts in splits.values() for n in counts))
    rows = [[("code", n), *(count(splits[s].get(n, 0)) for s in splits)] for n in names]
    blocks = [Table(["class", *splits], rows, "l" + "r" * len(splits), caption="Images per class (data report)",
                    scroll=len(rows) > 40)]
    ratio = (report.get("imbalance") or {}).get("ratio")
    if ratio is not None:
        blocks.insert(0, Para([f"Largest to smallest training class: {float(ratio):.1f} to 1."],
                              "warn" if float(ratio) > 3 else ""))
    blocks += [Para([w], "warn") for w in report.get("warnings") or []]
    return blocks


def mistakes_sections(model_dir: str, evaluation: Optional[dict], figures: dict, base_dir: str) -> list:
    """The report's sections on per-class scores, mistakes, calibration, TTA and class counts."""
    sections = []
    if evaluation and "per_class_metrics" in evaluation:
        sections += [
            Section("Per-class precision, recall and F1", "per-class", per_class_blocks(evaluation)),
            Section("Mistakes", "mistakes", mistakes_blocks(evaluation, figures, base_dir)),
            Section("Calibration", "calibration", calibration_blocks(evaluation, figures, base_dir)),
            Section("Test-time augmentation", "tta", tta_blocks(evaluation)),
        ]
    sections.append(Section("Class counts", "class-counts", class_count_blocks(read_data_report(model_dir))))
    return sections

