"""How ranks set up together (sparsebert/train/agreement.py), with real processes meeting at a real TCPStore and
forming a real gloo process group: a missing rank stops the others after the set-up timeout, an error on one
rank stops another that waits where the failed one will never arrive, and rank 0's decisions reach every rank.
(The same through the deepspeed launcher on two simulated nodes: tests/test_multinode.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from helpers import REPO, error_lines, free_port

from sparsebert.train import agreement

PRELUDE = """
import sys, time
import torch.distributed as dist
from sparsebert.train import agreement
from sparsebert import console
from sparsebert.train.config import ConfigError
def main():
"""


def _ranks(body: str, world: int, ranks: list[int] | None = None, timeout: float = 120, **env: str):
    """Run ``body`` (the inside of ``main()``) as ranks ``ranks`` of a world of ``world``, one node each; their
    results (exit status, output), in rank order. ``console.Stopped`` ends a rank with its status, as in
    pretrain.py."""
    script = (
        PRELUDE
        + textwrap.indent(textwrap.dedent(body), "    ")
        + """
try:
    main()
except console.Stopped as stop:
    sys.exit(stop.code)
"""
    )
    port = str(free_port())
    processes = []
    for rank in ranks if ranks is not None else range(world):
        environment = {
            **os.environ, "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": str(world), "CROSS_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "TORCH_CPP_LOG_LEVEL": "ERROR", **env,
        }  # fmt: skip
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", script],
                cwd=REPO,
                env=environment,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    return [(p.wait(timeout=timeout), p.communicate()[0]) for p in processes]


@pytest.mark.slow  # real rank processes (seconds each)
def test_a_rank_that_never_arrives_stops_the_others_naming_it():
    [(code, output)] = _ranks("agreement.rendezvous()", world=3, ranks=[0], SPARSEBERT_SETUP_TIMEOUT="2")
    assert code == 1 and error_lines(output) == [
        "error: only 1 of 3 ranks joined at 127.0.0.1:"
        + output.split("127.0.0.1:")[1].split(" ")[0]
        + " (MASTER_ADDR:MASTER_PORT) within 2 s (SPARSEBERT_SETUP_TIMEOUT); missing: rank 1, 2. Their node "
        "was not started, failed before joining (its own output says why), or cannot reach this address"
    ], output
    [(code, output)] = _ranks("agreement.rendezvous()", world=2, ranks=[1], SPARSEBERT_SETUP_TIMEOUT="2")
    assert code == 1 and "error: rank 1 (node_rank 1, host " in output and "could not reach rank 0" in output


@pytest.mark.slow  # real rank processes (seconds each)
def test_an_error_on_one_rank_stops_a_rank_that_waits_for_it_elsewhere():
    """Rank 1 fails; rank 0 is blocked in work that never ends (as in a collective rank 1 will never join).
    Rank 1 prints its error once, rank 0 one line naming rank 1 and why, and both exit non-zero."""
    body = """
    store = agreement.rendezvous()
    dist.init_process_group("gloo", store=store, rank=agreement.rank(), world_size=agreement.world_size())
    with agreement.all_or_none():
        if agreement.rank() == 1:
            raise ConfigError("data.path 'data/corpus': prepared corpus directory not found: data/corpus")
        time.sleep(3600)
    """
    (code0, output0), (code1, output1) = _ranks(body, world=2, timeout=60)
    assert code1 == 2 and error_lines(output1) == [
        "error: data.path 'data/corpus': prepared corpus directory not found: data/corpus"
    ], output1
    assert code0 == 1, output0
    [told] = error_lines(output0)
    assert told.startswith("error: rank 1 (node_rank 1, host ") and told.endswith(
        "failed during set-up: data.path 'data/corpus': prepared corpus directory not found: data/corpus; "
        "every rank stops"
    ), told
    assert "Traceback" not in output0 + output1


@pytest.mark.slow  # real rank processes (seconds each)
def test_rank_0_decides_for_every_rank_and_disagreement_is_an_error(tmp_path):
    """What rank 0 reads is what every rank gets (a file only rank 0's copy of a directory holds), and a value
    that differs between ranks (here the config) stops them all, naming how it differs."""
    (tmp_path / "node0").mkdir()
    (tmp_path / "node0" / "latest").write_text("step00000015")
    body = f"""
    store = agreement.rendezvous()
    dist.init_process_group("gloo", store=store, rank=agreement.rank(), world_size=agreement.world_size())
    with agreement.all_or_none():
        mine = "{tmp_path}/node" + str(agreement.rank()) + "/latest"
        tag = agreement.decide("tag", lambda: open(mine).read())
        print("tag", tag, flush=True)
        agreement.agree("the config", {{"lr": 0.1 * (1 + agreement.rank())}}, lambda a, b: "another lr")
    """
    (code0, output0), (code1, output1) = _ranks(body, world=2, timeout=60)
    assert "tag step00000015" in output0 and "tag step00000015" in output1  # rank 1 has no such file
    assert (code0, code1) == (2, 1), output0 + output1
    [error] = error_lines(output0)
    assert error.startswith("error: the config differs between ranks: rank 1 (node_rank 1, host") and (
        "another lr" in error
    ), error
    [told] = error_lines(output1)
    assert told.startswith("error: rank 0 (node_rank 0, host ") and "the config differs" in told, told


def test_differing_keys_name_the_dotted_keys_that_differ():
    ours = {
        "train": {"lr": 1e-3, "max_steps": 8},
        "model": {"attention_pattern": {"name": "star"}},
        "seed": 1,
    }
    theirs = {"train": {"lr": 2e-3, "max_steps": 8}, "model": {"attention_pattern": {"name": "dense"}}}
    # a pattern is one value (its parameters belong together); a key on one side only differs too
    assert agreement.differing_keys(ours, theirs) == ["model.attention_pattern", "seed", "train.lr"]


def test_a_single_rank_decides_gathers_and_owns_its_output_dir(tmp_path):
    """Without a process group of several ranks (``python sparsebert/pretrain.py``) every step is local."""
    assert agreement.decide("resume", lambda: {"tag": "step00000004"}) == {"tag": "step00000004"}
    [report] = agreement.gather("corpus", "abc")
    assert report["value"] == "abc" and report["where"] == agreement.where()
    assert agreement.on_each_node("cache", lambda: 7) == 7
    agreement.check_shared_dir(tmp_path / "run" / "x", "output_dir")
    assert (tmp_path / "run" / "x").is_dir()
