"""`pipeline.visualize` as a library call: which plots, of which run, into which folder (`make_plots`).

The run figures come from `pipeline.reporting.plots`, the network views from
`pipeline.reporting.views`; the model is loaded once, and only when a plot
needs it.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Iterable, Optional, Sequence

from pipeline import rundir
from pipeline.reporting import network
from pipeline.reporting import plots, views
from pipeline.reporting.plot_kinds import IMAGE_KINDS, KINDS, parse_kinds  # noqa: F401 (re-exported)

def parse_layers(values: Iterable[str]) -> list[str]:
    """Layer names from repeated and/or comma-separated `--layer` values."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _say(text: str) -> None:
    print(text, flush=True)


@dataclasses.dataclass
class _Job:
    """One `make_plots` call: the run, where the PNGs go, the options, and the model once loaded."""
    model_dir: str
    out: str
    runs: list
    image: Optional[str]
    layers: list
    filters: int
    steps: int
    max_channels: int
    gradcam_layer: Optional[str]
    checkpoint: str
    split: str
    _model: object = None

    def model(self):
        if self._model is None:
            self._model = network.load_run_model(self.model_dir, self.checkpoint)
        return self._model

    def skip_reason(self, kind: str) -> Optional[str]:
        if kind in IMAGE_KINDS and not self.image:
            return "needs --image=<file> (or --image=test:<i>)"
        if kind == "compare" and len(self.runs) < 2:
            return "needs two or more runs (positional arguments or --runs)"
        return None

    def input_image(self):
        """(image [H, W, 3] in [0, 1], tag for file names): a file, or `test:<i>` / `val:<i>`."""
        match = re.fullmatch(r"(test|val):(\d+)", self.image)
        if match and not os.path.exists(self.image):
            image, label = views.dataset_image(self.model_dir, match[1], int(match[2]))
            return image, f"{match[1]}{match[2]}_{label}"
        image = views.load_image(self.image, network.input_size(self.model()))
        return image, os.path.splitext(os.path.basename(self.image))[0]

    def plot(self, kind: str) -> list[str]:
        if kind == "compare":
            return [plots.plot_compare(self.runs, self.out)]
        if kind == "curves":
            return [plots.plot_curves(self.model_dir, self.out)]
        if kind == "lr":
            return [plots.plot_lr(self.model_dir, self.out)]
        if kind == "confusion":
            return [plots.plot_confusion(self.model_dir, self.out, split=self.split, checkpoint=self.checkpoint)]
        model = self.model()
        if kind == "filters":
            return [views.plot_filters(model, self.out)]
        if kind == "activation_max":
            chosen = self.layers or network.default_activation_layers(model)
            return views.plot_activation_max(model, chosen, self.out, filters=self.filters, steps=self.steps)
        image, tag = self.input_image()
        if kind == "feature_maps":
            chosen = self.layers or network.default_feature_layers(model)
            return views.plot_feature_maps(model, image, chosen, self.out, max_channels=self.max_channels,
                                           tag=tag)
        return [views.plot_gradcam(model, image, self.out, layer=self.gradcam_layer, tag=tag,
                                   class_names=rundir.read_labels(self.model_dir))]


def make_plots(model_dir: Optional[str], what: Sequence[str] = ("all",), *, runs: Sequence[str] = (),
               out: Optional[str] = None, image: Optional[str] = None, layers: Sequence[str] = (),
               filters: int = 16, steps: int = 128, max_channels: int = 32,
               gradcam_layer: Optional[str] = None, checkpoint: str = "best", split: str = "test",
               list_layers: bool = False, say: Callable[[str], None] = _say) -> list[str]:
    """Write the plots `what` asks for; returns the PNG paths (`say` reports each, and each skip).

    Args:
      model_dir: the run to plot; may be None for `compare` alone (the first of `runs`).
      what: kinds (KINDS) or "all": every kind the run supports, skipping
        (with a note) those that lack an image or a second run.
      runs: more run directories for `compare` (`model_dir` joins them).
      out: output folder (default `<model_dir>/plots`).
      image: feature_maps / gradcam input: a file, or `test:<i>` / `val:<i>`.
      layers: feature_maps / activation_max layers (`--layer` values: names,
        indices or `outer/inner` paths, comma-separated or repeated).
      filters, steps: activation_max filters per layer and ascent steps.
      max_channels: feature_maps channels shown per layer.
      gradcam_layer: gradcam's 4-D layer (default: the input of `pool`).
      checkpoint: `best` or `last`, for the plots that need the model.
      split: confusion's split (`test` or `val`).
      list_layers: instead of plotting, `say` the model's layers; returns [].

    Raises:
      ValueError: an explicitly asked kind cannot be made, or no run is named.
      rundir.RunDirError: `model_dir` is not a run directory.
    """
    kinds = parse_kinds(what)
    explicit = "all" not in what
    runs = list(dict.fromkeys(([model_dir] if model_dir else []) + list(runs)))
    if not model_dir:
        if list_layers or not runs or (explicit and kinds != ["compare"]):
            raise ValueError("--model_dir is required (only --what=compare takes run directories "
                             "instead).")
        model_dir, kinds = runs[0], ["compare"]
    plots.require_run(model_dir)
    job = _Job(model_dir, out or plots.default_out_dir(model_dir), runs, image, parse_layers(layers),
               filters, steps, max_channels, gradcam_layer, checkpoint, split)
    if list_layers:
        say(network.format_layers(job.model()))
        return []
    written = []
    for kind in kinds:
        skip = job.skip_reason(kind)
        if skip:
            if explicit:
                raise ValueError(f"--what={kind} {skip}.")
            say(f"note: skipped {kind}: it {skip}")
            continue
        for path in job.plot(kind):
            say(f"wrote {path}")
            written.append(path)
    return written
