"""Pre-training end to end through the real `deepspeed` launcher (2 CPU ranks), read back through MLflow.

The launches are shared between tests (each costs ~40 s): one two-stage DAM_s run per ZeRO stage (0, 2, 3),
a ZeRO-2 run killed after a checkpoint, then resumed, one stopped by SIGTERM, then resumed, a bf16-autocast ZeRO-2
run with one skipped step, and a ZeRO-0 run that diverges.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import PRETRAIN, REPO, all_artifacts, free_port
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from sparsebert import SparseBertForPreTraining

MAX_STEPS, SEARCH_STEPS = 8, 4
COMMON = [
    "--config",
    "tiny_cpu",
    "model.max_position_embeddings=64",
    "model.attention_pattern={name: dam_s, lambda: 0.01}",
    f"train.max_steps={MAX_STEPS}",
    f"dam.search_steps={SEARCH_STEPS}",
    "train.micro_batch_size=4",
    "train.optimizer=adamw",  # LAMB needs ZeRO stage 0; the parity test compares stages 0, 2 and 3
    "train.lr=1e-3",
    "train.warmup_steps=2",
    "train.log_every=1",
    "eval.every=4",
    "checkpoint.every=2",
    "checkpoint.keep_last=2",
    "data.log_sample_ids=true",
    "mlflow.experiment=test-pretrain",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory, pretrain_corpus) -> Path:
    """Initial weights shared by every run: ZeRO-3 builds models partitioned, drawing random init differently."""
    from transformers import AutoTokenizer

    from sparsebert import SparseBertConfig

    tokenizer = AutoTokenizer.from_pretrained(pretrain_corpus / "tokenizer")
    config = SparseBertConfig(
        vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=512, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
        attention_pattern={"name": "dam_s", "lambda": 0.01},
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("init")
    SparseBertForPreTraining(config).save_pretrained(path)
    return path


class Launcher:
    """Runs pretrain.py under the deepspeed launcher with 2 CPU ranks; one MLflow store for all runs."""

    def __init__(self, root: Path, corpus: Path, init_dir: Path, mlflow_uri: str):
        self.root, self.corpus, self.init_dir, self.mlflow_uri = root, corpus, init_dir, mlflow_uri
        self.results: dict[str, subprocess.CompletedProcess] = {}
        self.ports: dict[str, int] = {}

    def run(
        self, name: str, ds_config: str, *extra: str, env: dict | None = None, ranks: int = 2
    ) -> subprocess.CompletedProcess:
        self.ports[name] = port = free_port()
        cmd = [
            "deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), str(PRETRAIN), *COMMON,
            f"output_dir={self.root / name}", f"deepspeed_config=ds_configs/{ds_config}",
            f"data.path={self.corpus}", f"model.init_from={self.init_dir}", *extra,
        ]  # fmt: skip
        environment = {
            **os.environ,
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "OMP_NUM_THREADS": "1",
            **(env or {}),
        }
        result = subprocess.run(cmd, cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)
        (self.root / f"{name}.log").write_text(result.stdout + result.stderr)
        return result

    def completed(self, name: str, ds_config: str) -> Path:
        if name not in self.results:
            self.results[name] = self.run(name, ds_config)
        result = self.results[name]
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return self.root / name

    def mlflow_run(self, name: str):
        client = MlflowClient(self.mlflow_uri)
        experiment = client.get_experiment_by_name("test-pretrain")
        runs = client.search_runs([experiment.experiment_id], f"tags.mlflow.runName = '{name}'")
        assert len(runs) == 1, f"expected one MLflow run named {name}, found {len(runs)}"
        return client, runs[0]

    def losses(self, name: str) -> dict[int, float]:
        client, run = self.mlflow_run(name)
        history = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.timestamp)
        return {m.step: m.value for m in history}  # a step logged twice (crash, resume): the last one wins


@pytest.fixture(scope="module")
def launcher(tmp_path_factory, pretrain_corpus, init_dir) -> Launcher:
    root = tmp_path_factory.mktemp("runs")
    return Launcher(root, pretrain_corpus, init_dir, f"sqlite:///{root / 'mlflow.db'}")


def _rank_masks(out: Path, stage: str) -> list[torch.Tensor]:
    return [load_file(out / "masks" / f"{stage}.rank{r}.safetensors")["mask"] for r in (0, 1)]


@pytest.mark.parametrize("ds_config", ["cpu_zero2.json", "cpu_zero3.json"])
def test_zero_stages_match_zero0_and_loss_falls(launcher, ds_config):
    reference = launcher.losses(launcher.completed("zero0", "cpu.json").name)
    out = launcher.completed(ds_config.removesuffix(".json"), ds_config)
    losses = launcher.losses(out.name)
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    steps = sorted(reference)
    torch.testing.assert_close(
        torch.tensor([losses[s] for s in steps]),
        torch.tensor([reference[s] for s in steps]),
        rtol=2e-3,
        atol=2e-3,
    )
    assert sum(losses[s] for s in steps[-2:]) < sum(losses[s] for s in steps[:2])


def test_dam_mask_frozen_identically_on_both_ranks_and_kept(launcher):
    out = launcher.completed("cpu_zero2", "cpu_zero2.json")
    frozen = _rank_masks(out, "stage1_frozen")
    final = _rank_masks(out, "final")
    assert torch.equal(frozen[0], frozen[1]), "ranks froze different masks"
    assert torch.equal(final[0], frozen[0]) and torch.equal(final[1], frozen[0]), "stage 2 changed the mask"
    assert frozen[0].dtype == torch.bool
    assert torch.equal(frozen[0][0], frozen[0][0].transpose(-1, -2))  # dam_s: symmetric Toeplitz

    model = SparseBertForPreTraining.from_pretrained(out / "final")
    assert model.config.attention_pattern["name"] == "dam_s" and model.config.attention_pattern["frozen"]
    assert torch.equal(model.current_mask(64), frozen[0])
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out / "final").vocab_size == model.config.vocab_size


def test_a_config_error_under_the_launcher_is_one_line_from_rank_0(launcher):
    result = launcher.run("typo", "cpu.json", "train.max_stepz=3")
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "error: " in line]
    assert len(errors) == 1 and "unknown config key 'train.max_stepz'" in errors[0], errors
    assert "Traceback" not in result.stdout + result.stderr


def test_cpu_ranks_leave_no_shared_memory_behind(launcher):
    launcher.completed("cpu_zero2", "cpu_zero2.json")
    port = launcher.ports["cpu_zero2"]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_mlflow_run_holds_params_metrics_and_artifacts(launcher):
    out = launcher.completed("cpu_zero2", "cpu_zero2.json")
    client, run = launcher.mlflow_run(out.name)
    params = run.data.params
    assert params["world_size"] == "2"
    assert params["deepspeed.zero_optimization.stage"] == "2"
    assert json.loads(params["model.attention_pattern"])["name"] == "dam_s"
    assert params["train.max_steps"] == str(MAX_STEPS) and len(params["git_commit"]) >= 7
    expected = {
        "loss", "mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy", "mask_penalty", "mask_density", "lr",
        "tokens_per_s", "samples_per_s", "frozen_sparsity",
    }  # fmt: skip
    assert expected <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "mlm_loss")) == MAX_STEPS
    held_out = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/mlm_loss")}
    assert sorted(held_out) == [0, 4, 8] and all(0 < v < 20 for v in held_out.values())  # 0: the start
    assert {"val/mlm_accuracy", "val/nsp_loss", "grad_norm"} <= set(run.data.metrics)
    recorded = json.loads((out / "final" / "pretraining_metrics.json").read_text())
    assert recorded["step"] == MAX_STEPS and recorded["val/mlm_loss"] == pytest.approx(held_out[8])
    penalty_steps = [m.step for m in client.get_metric_history(run.info.run_id, "mask_penalty")]
    assert max(penalty_steps) == SEARCH_STEPS  # λ·‖M‖₁ only while searching
    artifacts = all_artifacts(client, run.info.run_id)
    for path in (
        "config/train.yaml",
        "config/deepspeed.json",
        "masks/stage1_frozen/mask.safetensors",
        "masks/stage1_frozen/mask_layer0.png",
        "masks/stage1_frozen/importance_by_distance.png",
        "masks/final/mask.safetensors",
    ):
        assert path in artifacts, f"{path} not in {sorted(artifacts)}"
    assert run.data.tags["final_model_dir"] == str((out / "final").resolve())


def test_a_preempted_then_killed_run_resumes_to_the_same_loss_and_reads_each_sample_once(launcher):
    """A real SIGTERM to the last rank after step 3 (as a preemption sends): every rank stops at that step
    boundary with a checkpoint and exit 0. The same command resumes; killed after step 5, it leaves step 4's
    checkpoint; the same command once more ends with the uninterrupted run's losses, every rank having read the
    uninterrupted run's samples."""
    stopped = launcher.run("resumed", "cpu_zero2.json", env={"SPARSEBERT_FAULTS": "sigterm_at_step=3"})
    assert stopped.returncode == 0, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    assert "stopped by a stop signal on another rank at step 3" in stopped.stdout
    out = launcher.root / "resumed"
    assert (out / "checkpoints" / "latest").read_text() == "step00000003" and not (out / "final").exists()
    crashed = launcher.run("resumed", "cpu_zero2.json", env={"SPARSEBERT_FAULTS": "crash_after_step=5"})
    assert crashed.returncode != 0
    assert "resumed from step00000003 at step 3" in crashed.stdout
    assert (out / "checkpoints" / "latest").read_text() == "step00000004"
    resumed = launcher.run("resumed", "cpu_zero2.json")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from step00000004" in resumed.stdout
    reference_out = launcher.completed("cpu_zero2", "cpu_zero2.json")

    reference, losses = launcher.losses("cpu_zero2"), launcher.losses("resumed")
    for step in range(1, MAX_STEPS + 1):
        assert losses[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    assert sorted(p.name for p in (out / "checkpoints").glob("step*")) == ["step00000006", "step00000008"]

    def consumed(run_dir: Path) -> dict[tuple[int, int], list[int]]:
        records = {}  # (rank, step) -> sample ids; a step replayed after the crash: the last record wins
        for rank in (0, 1):
            for line in (run_dir / f"samples.rank{rank}.jsonl").read_text().splitlines():
                record = json.loads(line)
                records[(rank, record["step"])] = record["ids"]
        return records

    got, expected = consumed(out), consumed(reference_out)
    assert got == expected
    everything = [i for ids in got.values() for i in ids]
    assert len(everything) == len(set(everything)) == MAX_STEPS * 2 * 4


def test_skipped_step_moves_neither_schedule_in_a_bf16_autocast_run(launcher):
    """bf16 (torch autocast, fp32 gradient accumulation) ZeRO-2; rank 0's loss is made infinite once, aiming at
    step 3: DeepSpeed skips that update on both ranks, and neither the LR schedule nor the step count that drives
    the DAM schedule, checkpoints and logs advances for it."""
    result = launcher.run(
        "skipped",
        "zero2_bf16.json",
        "train.grad_accum_steps=2",
        env={"SPARSEBERT_FAULTS": "nonfinite_at_step=3"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "bfloat16 autocast, fp32 weights and gradient accumulation" in result.stdout
    assert (
        "stage 1: attention backend sdpa (model.attention_backend=auto), attention dropout 0.1"
        in result.stdout
    )
    client, run = launcher.mlflow_run("skipped")
    history = {
        key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        for key in ("loss", "lr", "skipped_steps", "frozen_sparsity")
    }
    assert sorted(history["loss"]) == list(range(1, MAX_STEPS + 1))
    assert all(value == value and abs(value) < 1e6 for value in history["loss"].values())  # finite
    assert history["skipped_steps"][2] == 0 and history["skipped_steps"][MAX_STEPS] == 1
    reference = launcher.completed("cpu_zero2", "cpu_zero2.json").name
    _, reference_run = launcher.mlflow_run(reference)
    reference_lr = {m.step: m.value for m in client.get_metric_history(reference_run.info.run_id, "lr")}
    assert history["lr"] == reference_lr  # the schedule counts applied steps only
    assert list(history["frozen_sparsity"]) == [SEARCH_STEPS]
    params = run.data.params
    assert params["precision"].startswith("bfloat16 autocast") and params["device_type"] == "cpu"
    assert params["attention.stage1.backend"] == "sdpa" and params["attention.stage2.backend"] == "sdpa"
    assert float(params["attention.stage1.dropout"]) == 0.1
    out = launcher.root / "skipped"
    for rank in (0, 1):
        records = [json.loads(line) for line in (out / f"samples.rank{rank}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if not r["applied"]] == [3]  # the same step on both ranks
        assert len(records) == MAX_STEPS + 1
    state = json.loads((out / "checkpoints" / f"step{MAX_STEPS:08d}" / "train_state.json").read_text())
    assert state["skipped_steps"] == 1


def test_consecutive_non_finite_steps_stop_the_run_naming_the_last_good_checkpoint(launcher):
    """ZeRO-0 (where the trainer guards the optimizer itself): rank 0's loss is infinite from step 5 on; the
    steps are skipped, never applied, and after train.max_bad_steps the run stops naming step 4's checkpoint."""
    result = launcher.run(
        "diverged", "cpu.json", "train.max_bad_steps=3", env={"SPARSEBERT_FAULTS": "nonfinite_from_step=5"}
    )
    assert result.returncode != 0
    assert "3 consecutive steps were skipped" in result.stderr + result.stdout
    assert "the last good checkpoint is step00000004" in result.stderr + result.stdout
    root = launcher.root / "diverged" / "checkpoints"
    assert (root / "latest").read_text() == "step00000004" and (
        root / "step00000004" / "train_state.json"
    ).is_file()
    losses = launcher.losses("diverged")
    assert sorted(losses) == [1, 2, 3, 4] and all(abs(v) < 1e6 for v in losses.values())


def test_resuming_on_other_world_sizes_continues_the_data_without_repeats_or_gaps(launcher, pretrain_corpus):
    """Killed after step 4 on 2 ranks, resumed on 1 with checkpoint.reshard and killed after step 6, resumed on 2
    again: the run completes, and the samples all ranks consumed are exactly the first ones of the epoch's global
    order, each once."""
    name = "reshard"
    crashed = launcher.run(name, "cpu_zero2.json", env={"SPARSEBERT_FAULTS": "crash_after_step=4"}, ranks=2)
    assert crashed.returncode != 0
    refused = launcher.run(name, "cpu_zero2.json", ranks=1)
    assert refused.returncode != 0 and "checkpoint.reshard=true" in refused.stdout + refused.stderr
    shrunk = launcher.run(
        name,
        "cpu_zero2.json",
        "checkpoint.reshard=true",
        env={"SPARSEBERT_FAULTS": "crash_after_step=6"},
        ranks=1,
    )
    assert shrunk.returncode != 0 and "resumed from step00000004 at step 4" in shrunk.stdout, shrunk.stdout[
        -3000:
    ]
    grown = launcher.run(name, "cpu_zero2.json", "checkpoint.reshard=true", ranks=2)
    assert grown.returncode == 0, grown.stdout[-3000:] + grown.stderr[-3000:]
    assert "resumed from step00000006 at step 6" in grown.stdout
    out = launcher.root / name
    consumed = []  # every rank's applied steps: 1-4 on 2 ranks, 5-6 on 1, 7-8 on 2
    for log in out.glob("samples.rank*.jsonl"):
        records = [json.loads(line) for line in log.read_text().splitlines()]
        consumed += [i for record in records if record["applied"] for i in record["ids"]]
    from sparsebert.data import ShardReader

    total = (4 * 2 + 2 * 1 + 2 * 2) * 4  # rank-steps × micro-batches of 4
    order = next(
        iter(ShardReader(pretrain_corpus, rank=0, world_size=1, batch_size=total, seed=42, prefetch=0))
    )
    assert sorted(consumed) == sorted(order["sample_index"].tolist())
    assert len(launcher.losses(name)) == MAX_STEPS


def test_bad_config_fails_fast_naming_the_key(tmp_path):
    for override, message in [
        ("train.max_step=3", "unknown config key 'train.max_step'"),
        ("train.lr=fast", "config key 'train.lr' must be float"),
        ("model.attention_pattern=strided3", "unknown attention pattern 'strided3'"),
    ]:
        result = subprocess.run(
            [sys.executable, str(PRETRAIN), f"output_dir={tmp_path}", override],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert not any(tmp_path.iterdir())  # nothing written


def test_plain_python_run_restarting_weights_for_stage_two(tmp_path, pretrain_corpus):
    """One process without the launcher; stage 2 from fresh weights keeps the frozen mask."""
    out = tmp_path / "restart"
    cmd = [
        sys.executable, str(PRETRAIN), *COMMON, f"output_dir={out}", f"data.path={pretrain_corpus}",
        "train.max_steps=6", "dam.search_steps=3", "dam.restart_weights=true", "mlflow.enabled=false",
        "checkpoint.every=0",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    frozen = load_file(out / "masks" / "stage1_frozen.rank0.safetensors")["mask"]
    assert torch.equal(load_file(out / "masks" / "final.rank0.safetensors")["mask"], frozen)
    state = json.loads((out / "checkpoints" / "step00000006" / "train_state.json").read_text())
    assert state["stage"] == 2 and state["restarted"] is True
    model = SparseBertForPreTraining.from_pretrained(out / "final")
    assert torch.equal(model.current_mask(64), frozen)
