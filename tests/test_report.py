"""Run reports and comparison reports (`pipeline.report`).

Costs: reuses the session `digits_run` (one in-process report with a test
evaluation, the layer summary and one export read back); the comparison,
interrupted and no-test-split runs are copies of it with edited files (no
training); two short subprocesses (the CLI, without TensorFlow) and one
sleeping process that holds a run file open.
"""
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

from pipeline import reporting, rundir
from pipeline.reporting import run_report
from pipeline.reporting.status import run_status
from pipeline.tuning import layout
from tests.helpers import last_line, run_cli

SECTIONS = ("Reproduce", "Data", "Model", "Precision, strategy and device", "Hyperparameters", "Training",
            "Test results", "Export")


# --------------------------------------------------------------------------- helpers

def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def read_json(path):
    return json.loads(read(path))


def md_tables(text):
    """Every markdown table as (header cells, rows of cells); `**` emphasis removed."""
    tables, current = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip().replace("**", "") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if current is None:
                current = (cells, [])
            elif not all(re.fullmatch(r"-+:?", c) for c in cells):
                current[1].append(cells)
        elif current is not None:
            tables.append(current)
            current = None
    if current is not None:
        tables.append(current)
    return tables


def table_with(text, *headers):
    found = [t for t in md_tables(text) if all(h in t[0] for h in headers)]
    assert len(found) == 1, f"expected one table with {headers}, found {len(found)}"
    header, rows = found[0]
    return [dict(zip(header, row)) for row in rows]


def section(text, title):
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"no section {title!r}"
    return match[1]


def pct(text):
    assert text.endswith("%"), text
    return float(text[:-1]) / 100


VOID = {"meta", "img", "br", "hr", "link", "input"}


class StrictHTML(HTMLParser):
    """Fails on any unbalanced or mis-nested tag; records img src and a href."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.images, self.hrefs, self.tags = [], [], [], []

    def _attrs(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for key in ("href", "src"):
            if key in attrs and tag != "img":
                self.hrefs.append(attrs[key])

    def handle_starttag(self, tag, attrs):
        self._attrs(tag, attrs)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        assert tag in VOID, f"<{tag}/> is not a void element"
        self._attrs(tag, attrs)

    def handle_endtag(self, tag):
        assert tag not in VOID, f"</{tag}> closes a void element"
        assert self.stack, f"</{tag}> without an open tag"
        assert self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1]}> (open: {self.stack})"
        self.stack.pop()

    def close(self):
        super().close()
        assert not self.stack, f"unclosed tags: {self.stack}"


def check_html(text):
    assert text.startswith("<!DOCTYPE html>")
    parser = StrictHTML()
    parser.feed(text)
    parser.close()
    ET.fromstring(text.split("\n", 1)[1])   # also well-formed XML (void elements self-closed)
    for src in parser.images:
        assert src.startswith("data:image/png;base64,"), src[:80]
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    external = [h for h in parser.hrefs if not h.startswith("#")]
    assert not external, f"references outside the page: {external}"
    assert "script" not in parser.tags and "link" not in parser.tags
    return parser


def _drop_deploy_record(model_dir):
    if os.path.exists(os.path.join(model_dir, "deploy.json")):
        os.remove(os.path.join(model_dir, "deploy.json"))


def copy_run(source, target, *, checkpoints=True):
    """A copy of a run directory (files keep their times, so cached evaluations stay fresh)."""
    # Another xdist worker may be writing into the shared run (an export's deploy.json): its temp files
    # come and go while the tree is copied.
    skipped = (rundir.TMP_PREFIX + "*",) + (() if checkpoints else ("checkpoints", "tensorboard", "plots", "report.*"))
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*skipped))
    config = read_json(os.path.join(target, "config.json"))
    config["model_dir"] = str(target)
    write_json(os.path.join(target, "config.json"), config)
    return str(target)


def write_json(path, data):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)


def write_metrics(model_dir, rows):
    lines = [",".join(rundir.METRIC_COLUMNS)]
    lines += [",".join("" if r.get(c) is None else str(r[c]) for c in rundir.METRIC_COLUMNS) for r in rows]
    with open(os.path.join(model_dir, "metrics.csv"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- a real run's report

@pytest.fixture(scope="module")
def digits_report(digits_run, tmp_path_factory):
    from pipeline.serving import export

    # A private copy: other test files export the shared run (`pipeline.export` writes deploy.json into
    # it, which adds a Deployment section and its figures, tested in test_deploy.py), in an order that
    # depends on how the suite is split over workers.
    model_dir = copy_run(digits_run["model_dir"], tmp_path_factory.mktemp("report") / "run")
    _drop_deploy_record(model_dir)
    # Its own export (the fixture's `--export` went to the shared ./saved_models, which other
    # sessions prune): the report must find it through the model card's source_run.
    exports = str(tmp_path_factory.mktemp("exports"))
    export_path = export.export_run(model_dir, export_root=exports)
    start = time.time()
    md, page = reporting.write_run_report(model_dir, export_roots=[exports])
    return {"model_dir": model_dir, "md": read(md), "html": read(page), "md_path": md, "html_path": page,
            "export": export_path, "seconds": time.time() - start}


def test_run_report_shows_every_section_with_the_runs_numbers(digits_report):
    text, model_dir = digits_report["md"], digits_report["model_dir"]
    summary = read_json(os.path.join(model_dir, "summary.json"))
    config = read_json(os.path.join(model_dir, "config.json"))
    assert digits_report["md_path"] == os.path.join(model_dir, "report.md")
    assert [s for s in SECTIONS if f"\n## {s}\n" not in text] == []

    # The command that repeats it: the verb from the flagfile's header.
    assert f"python -m pipeline.train --flagfile={os.path.join(model_dir, 'flags.cfg')}" in text
    # Data and split sizes.
    splits = {r["split"]: int(r["images"].replace(",", "")) for r in table_with(text, "split", "images")}
    assert splits == summary["split_sizes"]
    assert "Dataset `digits`" in text
    # Model: name, parameter count, compact layer summary of its 72 layers.
    model = section(text, "Model")
    assert f"**resnet20**: **{summary['parameters']:,}** parameters" in model
    layers = table_with(model, "layer", "type", "output shape")
    assert len(layers) == 2 * run_report.LAYER_ROWS + 1
    assert re.fullmatch(r"… \d+ more layers …", layers[run_report.LAYER_ROWS]["layer"])
    assert layers[-1]["layer"] == "`logits`" and layers[-1]["output shape"] == "`(None, 10)`"
    # ResNet-20: 6n+2 = 20 weighted layers (19 convolutions, 1 dense), 9 residual additions.
    by_type = {r["type"]: int(r["layers"]) for r in table_with(model, "type", "layers")}
    assert (by_type["Conv2D"], by_type["Dense"], by_type["Add"]) == (19, 1, 9)
    assert f"*{sum(by_type.values())} layers by type*" in model
    assert "<details><summary>All 72 layers</summary>" not in model   # HTML only
    # Precision, strategy, device.
    rows = md_tables(section(text, "Precision, strategy and device"))[0][1]
    hardware = {row[0]: row[1].strip("`") for row in rows}
    assert hardware["precision"] == summary["precision"]
    assert hardware["strategy"] == summary["strategy"]
    assert hardware["device"] == summary["device"]
    # Hyperparameters from config.json.
    settings = {r["setting"].strip("`"): r["value"] for t in md_tables(section(text, "Hyperparameters"))
                for r in [dict(zip(t[0], row)) for row in t[1]]}
    assert settings["optimizer"] == config["train"]["optimizer"]["name"] == "sgd"
    assert float(settings["learning_rate"]) == config["train"]["optimizer"]["learning_rate"] == 0.05
    assert settings["schedule"] == "cosine" and int(settings["epochs"]) == 3
    assert int(settings["batch_size"]) == config["data"]["batch_size"]


def test_epoch_table_best_epoch_and_test_accuracy_match_the_run_files(digits_report):
    text, model_dir = digits_report["md"], digits_report["model_dir"]
    summary = read_json(os.path.join(model_dir, "summary.json"))
    metrics = rundir.read_metrics(model_dir)
    table = table_with(text, "epoch", "loss", "val_accuracy", "lr", "time")
    assert len(table) == len(metrics) == 3
    for row, m in zip(table, metrics):
        epoch = int(row["epoch"].split()[0])
        assert epoch == m["epoch"]
        assert abs(float(row["loss"]) - m["loss"]) < 6e-5
        assert abs(float(row["val_loss"]) - m["val_loss"]) < 6e-5
        assert abs(pct(row["accuracy"]) - m["accuracy"]) < 6e-5
        assert abs(pct(row["val_accuracy"]) - m["val_accuracy"]) < 6e-5
        assert abs(float(row["lr"]) - m["lr"]) <= 1e-4 * m["lr"]
        assert abs(float(row["time"].split()[0]) - m["epoch_seconds"]) < 0.06
        assert ("(best)" in row["epoch"]) == (epoch == summary["best_epoch"])
    best = summary["best_epoch"]
    best_value = 100 * summary["best_val_accuracy"]
    assert f"Best epoch {best} of {summary['epochs_done']} (val_accuracy {best_value:.2f}%)" in text
    test_line = (f"Test accuracy **{100 * summary['test_accuracy']:.2f}%** (loss {summary['test_loss']:.4f}) "
                 f"on {summary['split_sizes']['test']} images, best checkpoint (epoch {best})")
    assert test_line in text
    # Per-class accuracy (from evaluating the best checkpoint) agrees with the test accuracy training
    # measured with model.evaluate, and covers every test image and class.
    per_class = table_with(text, "class", "accuracy", "test images")
    assert [r["class"].strip("`") for r in per_class] == rundir.read_labels(model_dir)
    images = [int(r["test images"]) for r in per_class]
    correct = sum(pct(r["accuracy"]) * n for r, n in zip(per_class, images))
    assert sum(images) == summary["split_sizes"]["test"]
    assert abs(correct / sum(images) - summary["test_accuracy"]) <= 1.01 / sum(images)   # one image at most
    # The figures: written under <run>/plots/ and linked relatively from the markdown.
    for name in ("curves.png", "lr.png", "confusion_test.png"):
        assert f"](plots/{name})" in text
        with open(os.path.join(model_dir, "plots", name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_export_path_and_signatures_are_read_from_the_saved_model(digits_report):
    export = section(digits_report["md"], "Export")
    assert f"Export `{digits_report['export']}`" in export
    signatures = {r["signature"].strip("`"): r for r in table_with(export, "signature", "inputs", "outputs")}
    assert list(signatures) == ["serving_default", "serving_bytes"]
    assert signatures["serving_default"]["inputs"] == "images: float32 [batch, ?, ?, 3]"
    assert signatures["serving_bytes"]["inputs"] == "image_bytes: string [batch]"
    for sig in signatures.values():
        assert "probabilities: float32 [batch, 10]" in sig["outputs"]
        assert "class_names: string [batch]" in sig["outputs"]


def test_html_is_well_formed_self_contained_and_says_the_same(digits_report):
    text, model_dir = digits_report["html"], digits_report["model_dir"]
    summary = read_json(os.path.join(model_dir, "summary.json"))
    parser = check_html(text)
    assert len(parser.images) == 5                      # curves, lr, confusion, reliability, top losses: inline
    assert "<style>" in text and "plots/curves.png" not in re.sub(r"<figcaption>.*?</figcaption>", "", text)
    assert f"{100 * summary['test_accuracy']:.2f}%" in text
    assert f"{summary['parameters']:,}" in text
    assert "serving_default" in text and digits_report["export"] in text
    for title in SECTIONS:
        assert f">{title}</h2>" in text
    assert "<details><summary>All 72 layers</summary>" in text    # the full list, collapsed


# --------------------------------------------------------------------------- comparison

def three_runs(digits_dir, root):
    """Copies of the digits run that differ in optimizer and learning rate, with edited results."""
    variants = [("sgd_lr0.05", "sgd", 0.05, -0.20, 0.70), ("adam_lr0.001", "adam", 0.001, 0.0, 0.93),
                ("sgd_lr0.1", "sgd", 0.1, -0.05, 0.88)]
    runs = {}
    for name, optimizer, lr, shift, test_accuracy in variants:
        run = copy_run(digits_dir, root / name, checkpoints=False)
        config = read_json(os.path.join(run, "config.json"))
        config["train"]["optimizer"].update(name=optimizer, learning_rate=lr)
        write_json(os.path.join(run, "config.json"), config)
        flags_text = read(os.path.join(run, "flags.cfg"))
        flags_text = re.sub(r"--optimizer=\w+", f"--optimizer={optimizer}", flags_text)
        flags_text = re.sub(r"--learning_rate=[\d.]+", f"--learning_rate={lr}", flags_text)
        with open(os.path.join(run, "flags.cfg"), "w") as f:
            f.write(flags_text)
        rows = [dict(r, val_accuracy=round(min(1.0, max(0.0, r["val_accuracy"] + shift)), 6))
                for r in rundir.read_metrics(run)]
        write_metrics(run, rows)
        summary = read_json(os.path.join(run, "summary.json"))
        best = max(rows, key=lambda r: r["val_accuracy"])
        summary.update(best_val_accuracy=best["val_accuracy"], best_epoch=best["epoch"],
                       test_accuracy=test_accuracy, wall_seconds=100.0 + 10 * len(runs))
        write_json(os.path.join(run, "summary.json"), summary)
        runs[name] = {"dir": run, "optimizer": optimizer, "lr": lr, "best": best["val_accuracy"],
                      "test": test_accuracy, "wall": summary["wall_seconds"]}
    return runs


def test_compare_report_has_only_the_differing_flags_sorted_by_val_accuracy(digits_run, tmp_path):
    runs = three_runs(digits_run["model_dir"], tmp_path)
    out = tmp_path / "out" / "cmp"
    proc = run_cli("report", "--compare", *[r["dir"] for r in runs.values()], f"--out={out}.md")
    assert proc.stdout.split() == [f"{out}.md", f"{out}.html"]
    text = read(f"{out}.md")
    header, rows = [t for t in md_tables(text) if "run" in t[0]][0]
    assert header[header.index("run") + 1:header.index("best val_accuracy")] == ["optimizer", "learning_rate"]
    expected = sorted(runs.items(), key=lambda kv: -kv[1]["best"])
    assert [r[header.index("run")].strip("`") for r in rows] == [name for name, _ in expected]
    for row, (name, run) in zip(rows, expected):
        cells = dict(zip(header, row))
        assert cells["optimizer"] == run["optimizer"]
        assert float(cells["learning_rate"]) == run["lr"]
        assert abs(pct(cells["best val_accuracy"]) - run["best"]) < 6e-5
        assert abs(pct(cells["test accuracy"]) - run["test"]) < 6e-5
        assert cells["epochs"] == "3" and cells["status"] == "completed"
        assert cells["wall time"] == f"{int(run['wall']) // 60}m {int(run['wall']) % 60:02d}s"
    # One chart of the runs' curves, a PNG beside the report, inline in the HTML.
    assert "](plots/cmp.png)" in text
    assert os.path.getsize(tmp_path / "out" / "plots" / "cmp.png") > 10_000
    parser = check_html(read(f"{out}.html"))
    assert len(parser.images) == 1


def test_compare_a_tuning_directory_reads_its_trials(digits_run, tmp_path):
    runs = three_runs(digits_run["model_dir"], tmp_path / "src")
    tune = tmp_path / "tune"
    (tune / layout.TRIALS_DIR).mkdir(parents=True)
    lines = ["trial_id,status,run_dir"]
    for i, run in enumerate(runs.values()):
        target = str(tune / layout.TRIALS_DIR / f"{i:02d}")
        shutil.move(run["dir"], target)
        run["dir"] = target
        lines.append(f"{i:02d},completed,{target}")
    (tune / layout.TRIALS_CSV).write_text("\n".join(lines) + "\n")
    write_json(str(tune / layout.SEARCH_FILE), {"objective": "val_accuracy"})
    md, page = reporting.write_comparison_report([str(tune)])
    assert md == str(tune / "comparison.md") and page == str(tune / "comparison.html")
    text = read(md)
    rows = table_with(text, "run", "optimizer", "learning_rate")
    best_first = sorted(runs.values(), key=lambda r: -r["best"])
    assert [r["run"].strip("`") for r in rows] == [os.path.basename(r["dir"]) for r in best_first]
    assert f"tuning directory {tune}" in text
    assert os.path.exists(tune / "plots" / "comparison.png")


# --------------------------------------------------------------------------- unfinished runs and errors

def interrupt(run, epochs_done):
    """Make the copy look like a run killed after `epochs_done` epochs (the files train leaves)."""
    rows = rundir.read_metrics(run)[:epochs_done]
    write_metrics(run, rows)
    os.makedirs(os.path.join(run, "checkpoints"), exist_ok=True)
    best = max(rows, key=lambda r: r["val_accuracy"])
    write_json(os.path.join(run, "checkpoints", "state.json"),
               {"epochs_done": epochs_done, "best_epoch": best["epoch"], "best_value": best["val_accuracy"]})
    summary = read_json(os.path.join(run, "summary.json"))
    summary.update(status="running", epochs_done=0, best_epoch=None, best_val_accuracy=None,
                   test_loss=None, test_accuracy=None, wall_seconds=0.0)
    write_json(os.path.join(run, "summary.json"), summary)
    for name in ("evaluation_test.json", "confusion_test.csv"):
        if os.path.exists(os.path.join(run, name)):
            os.remove(os.path.join(run, name))
    return best


def test_interrupted_run_is_reported_as_interrupted_after_epoch_n(digits_run, tmp_path):
    run = copy_run(digits_run["model_dir"], tmp_path / "killed")
    best = interrupt(run, 2)
    status = run_status(run)
    assert (status.kind, status.epochs_done) == ("interrupted", 2)
    md, page = reporting.write_run_report(run, export_roots=[], load_model=False)
    text = read(md)
    assert "interrupted after epoch 2" in text and f"--resume --model_dir={run}" in text
    # The best checkpoint so far is still evaluated on the test split, and labelled as such.
    assert "the run itself never reached its final test evaluation" in section(text, "Test results")
    assert len(table_with(text, "class", "accuracy", "test images")) == 10
    assert len(table_with(text, "epoch", "loss", "val_accuracy")) == 2
    assert f"Best epoch {best['epoch']} of 2 (val_accuracy {100 * best['val_accuracy']:.2f}%)" in text
    assert "- **Status:** interrupted" in text
    html_text = read(page)
    check_html(html_text)
    assert 'class="badge interrupted"' in html_text and "interrupted after epoch 2" in html_text


def test_run_with_a_live_writer_is_still_running(digits_run, tmp_path):
    run = copy_run(digits_run["model_dir"], tmp_path / "live", checkpoints=False)
    interrupt(run, 1)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1], 'a'); "
                               "print('open', flush=True); time.sleep(120)", os.path.join(run, "metrics.csv")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        status = run_status(run)
        assert status.kind == "running" and holder.pid in status.live_pids
        assert "still running" in status.text and "1 epoch finished so far" in status.text
    finally:
        holder.kill()
        holder.wait()
    assert run_status(run).kind == "interrupted"


def test_run_without_a_test_split_says_so(digits_run, tmp_path):
    run = copy_run(digits_run["model_dir"], tmp_path / "notest")
    _drop_deploy_record(run)  # written by other test files' exports of the shared run
    config = read_json(os.path.join(run, "config.json"))
    config["data"]["test_fraction"] = 0.0
    write_json(os.path.join(run, "config.json"), config)
    summary = read_json(os.path.join(run, "summary.json"))
    summary["split_sizes"]["test"] = 0
    summary.update(test_accuracy=None, test_loss=None)
    write_json(os.path.join(run, "summary.json"), summary)
    for name in ("evaluation_test.json", "confusion_test.csv"):
        if os.path.exists(os.path.join(run, name)):
            os.remove(os.path.join(run, name))
    md, page = reporting.write_run_report(run, export_roots=[], load_model=False)
    text = read(md)
    assert "This run has no test split (0 test images)" in section(text, "Test results")
    assert "- **Test accuracy:** no test split" in text
    assert "confusion_test.png" not in text and not os.path.exists(os.path.join(run, "evaluation_test.json"))
    assert "- **Status:** completed (3 epochs)" in text
    assert len(check_html(read(page)).images) == 2            # curves and lr only


def test_missing_run_dir_is_one_error_line(tmp_path):
    missing = tmp_path / "nope"
    proc = run_cli("report", f"--model_dir={missing}", check=False)
    assert proc.returncode == 2
    assert last_line(proc.stderr) == f"error: Run directory {str(missing)!r} does not exist."
    assert "Traceback" not in proc.stderr
    with pytest.raises(rundir.RunDirError, match="does not exist"):
        reporting.write_comparison_report([str(missing)])


def test_importing_the_module_defines_no_flags():
    from absl import flags
    assert flags.FLAGS.get_flags_for_module("pipeline.report") == []
    assert "compare" not in flags.FLAGS
