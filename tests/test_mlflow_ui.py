"""What MLflow's UI shows of a run: the experiment kind (model training, not a GenAI app) set by pre-training and
evaluation alike, and mask pictures that read on their own (axes, legend or colour bar, sparsity, the layers
they stand for, cells large enough to see). Real sqlite MLflow stores, read back through ``MlflowClient``."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from mlflow import MlflowClient

from eval.tracking import Recorder
from sparsebert.model.masks import build_mask, distance_matrix, sparsity
from sparsebert.track import mask_plots
from sparsebert.track.mlflow_store import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND, MlflowStore
from sparsebert.track.tracker import RunTracker

L = 128


def _dam_importance(heads: int = 2) -> torch.Tensor:
    """A DAM_s-like σ(α) ``[heads, L, L]``: head 0 keeps a band around the diagonal, head 1 every 8th distance."""
    d = distance_matrix(L).float()
    return torch.stack([torch.sigmoid(2 - 0.2 * d), torch.sigmoid(torch.where(d % 8 == 0, 1.0, -1.0))])[
        :heads
    ]


def _kind(uri: str, name: str) -> str | None:
    return MlflowClient(uri).get_experiment_by_name(name).tags.get(EXPERIMENT_KIND_TAG)


def test_pretraining_run_files_its_experiment_as_model_training_with_its_mask_pictures(
    mlflow_uri, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # a sqlite store keeps artifacts in ./mlruns
    importance = _dam_importance().expand(2, -1, -1, -1)
    tracker = RunTracker(True, tmp_path / "run", start_wait=60)
    tracker.start(mlflow_uri, "pretrain-ui", "demo", None, {"train.max_steps": 2})
    tracker.log_mask("stage1_frozen", importance > 0.5, importance=importance)
    tracker.end()

    assert _kind(mlflow_uri, "pretrain-ui") == MODEL_TRAINING_KIND
    client = MlflowClient(mlflow_uri)
    files = {f.path for f in client.list_artifacts(tracker.run_id, "masks/stage1_frozen")}
    assert files == {
        f"masks/stage1_frozen/{name}"
        for name in (
            "mask.safetensors",
            "mask_layer0.png",
            "importance_layer0.png",
            "importance_by_distance.png",
        )
    }  # a mask shared by both layers is drawn once


def test_evaluation_files_its_experiment_as_model_training(mlflow_uri):
    recorder = Recorder("eval-ui", mlflow_uri)
    parent, resumed = recorder.open_parent("key", "checkpoint", {}, resume=False)
    recorder.close_parent(parent, failed=False)
    assert recorder.error is None and not resumed
    assert _kind(mlflow_uri, "eval-ui") == MODEL_TRAINING_KIND


def test_an_existing_experiment_gains_the_kind_and_a_kind_the_user_chose_stays(mlflow_uri):
    client = MlflowClient(mlflow_uri)
    client.create_experiment("made-elsewhere")
    client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    for name in ("made-elsewhere", "chosen"):
        store = MlflowStore(name, mlflow_uri)
        store.end(store.create_run("r"))
    assert _kind(mlflow_uri, "made-elsewhere") == MODEL_TRAINING_KIND
    assert _kind(mlflow_uri, "chosen") == "genai_development"


def _titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.get_title()]


def test_a_shared_boolean_mask_is_drawn_once_with_axes_legend_sparsity_and_legible_cells():
    mask = build_mask("longformer", L, 4)  # every head the same
    fig = mask_plots.heatmap_figure(mask, "final: mask, " + mask_plots.layers_label([0, 1], 2))
    try:
        fig.canvas.draw()
        (ax,) = fig.axes  # identical heads share one panel
        assert fig.get_suptitle() == f"final: mask, shared by all 2 layers (sparsity {sparsity(mask):.1%})"
        assert ax.get_title() == f"all 4 heads: sparsity {sparsity(mask):.1%}"
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("key position j", "query position i")
        assert [t.get_text() for t in fig.legends[0].get_texts()] == ["attended", "masked"]
        box = ax.get_window_extent()
        assert min(box.width, box.height) >= 4 * L  # pixels per cell at the saved DPI
    finally:
        plt.close(fig)


def test_per_layer_masks_get_a_picture_per_layer_and_importance_a_colour_bar(tmp_path):
    importance = _dam_importance()
    per_layer = torch.stack([importance, importance.flip(0)])  # layer 1 swaps the heads
    paths = mask_plots.mask_figures("stage1_frozen", per_layer > 0.5, per_layer, tmp_path)
    assert sorted(p.name for p in paths) == [
        "importance_by_distance.png",
        "importance_layer0.png",
        "importance_layer1.png",
        "mask_layer0.png",
        "mask_layer1.png",
    ]
    assert all(p.stat().st_size > 0 for p in paths)

    fig = mask_plots.heatmap_figure(per_layer[1], "stage1_frozen: importance σ(α), layer 1")
    try:
        panels = [ax for ax in fig.axes if ax.images]
        assert [ax.get_title().split(":")[0] for ax in panels] == ["head 0", "head 1"]
        colour_bar = [ax for ax in fig.axes if ax.get_ylabel().startswith("importance σ(α)")]
        assert len(colour_bar) == 1 and not fig.legends
    finally:
        plt.close(fig)


@pytest.mark.parametrize("layers", [1, 2])
def test_importance_by_distance_has_labelled_axes_and_a_legend_per_head(layers):
    importance = _dam_importance()
    groups = [(importance, "shared by all 2 layers")] if layers == 1 else [(importance, "layer 0")] * 2
    fig = mask_plots.distance_figure(groups, "stage1_frozen: mean importance by distance")
    try:
        assert len(fig.axes) == layers
        for ax in fig.axes:
            assert ax.get_xlabel().startswith("distance |i − j|")
            assert ax.get_ylabel() == "mean importance σ(α)"
            labels = [t.get_text() for t in ax.get_legend().get_texts()]
            assert labels[:2] == ["head 0", "head 1"]
            # the band head keeps short distances, the mean at distance 0 is σ(2) exactly
            assert ax.lines[0].get_ydata()[0] == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())
        assert _titles(fig)[0] in {"shared by all 2 layers", "layer 0"}
    finally:
        plt.close(fig)


def test_mask_pictures_are_saved_as_png(tmp_path: Path):
    mask = build_mask("star", L, 2).expand(3, -1, -1, -1)
    (path,) = mask_plots.mask_figures("final", mask, None, tmp_path)
    assert path.name == "mask_layer0.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
