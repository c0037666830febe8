"""How cluster/ starts runs, exercised for real on one machine: the Slurm script's signal path (run with bash
outside Slurm, where its #SBATCH lines are comments) and cluster/MULTINODE.md's environment file read by
DeepSpeed's own launcher."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import REPO as ROOT
from helpers import free_port

MULTINODE = (ROOT / "cluster" / "MULTINODE.md").read_text()
ENV_FILE = re.search(r"cat > ~/\.deepspeed_env <<'EOF'\n(.*?)\nEOF\n", MULTINODE, re.S).group(1) + "\n"


# --- Slurm: USR1 to the batch script reaches every rank; the job checkpoints and exits 0 ----------------------


@pytest.mark.slow
def test_sbatch_script_passes_usr1_to_every_rank_which_checkpoint_and_the_job_exits_0(
    pretrain_corpus, tmp_path
):
    out = tmp_path / "run"
    env = {
        **os.environ,
        "DS_ENV_FILE": ".deepspeed_env-none",  # not the machine's ~/.deepspeed_env
        "SPARSEBERT_GPUS_PER_NODE": "2",  # two CPU ranks on this "node"
        "SPARSEBERT_MASTER_PORT": str(free_port()),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "OMP_NUM_THREADS": "1",
    }
    args = [
        "--config", "tiny_cpu", "model.attention_pattern=star", "model.max_position_embeddings=64",
        "train.micro_batch_size=4",
        "checkpoint.every=2", "eval.every=1000", "eval.max_batches=1", f"data.path={pretrain_corpus}", f"output_dir={out}",
    ]  # fmt: skip

    def sbatch(*extra: str, signal_after_checkpoint: bool = False) -> str:
        job = subprocess.Popen(
            ["bash", "cluster/pretrain.sbatch", *args, *extra],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        if signal_after_checkpoint:  # the ranks are training (their handlers are in place): Slurm's warning
            deadline = time.monotonic() + 300
            while not (out / "checkpoints" / "latest").exists() and job.poll() is None:
                assert time.monotonic() < deadline, "no checkpoint within 5 minutes"
                time.sleep(0.5)
            job.send_signal(signal.SIGUSR1)  # to the script alone, as --signal=B:USR1 sends it
        log = job.communicate(timeout=600)[0]
        (tmp_path / f"sbatch{len(list(tmp_path.glob('sbatch*.log')))}.log").write_text(log)
        assert job.returncode == 0, log[-4000:]
        return log

    log = sbatch("train.max_steps=2000", signal_after_checkpoint=True)
    stopped = re.search(r"stopped by (?:SIGUSR1|a stop signal on another rank) at step (\d+)", log)
    assert stopped and "USR1 received" in log, log[-4000:]
    step = int(stopped.group(1))
    assert step < 2000 and not (out / "final").exists()
    assert (out / "checkpoints" / "latest").read_text() == f"step{step:08d}"
    assert log.count("exits successfully") == 2  # both ranks exited 0 under a launcher that survived

    resumed = sbatch(f"train.max_steps={step + 1}")
    assert f"resumed from step{step:08d} at step {step}" in resumed
    assert (out / "final" / "config.json").is_file()


# --- .deepspeed_env: the documented file, read by DeepSpeed's launcher, reaches every rank as written ----------


def _expected_env() -> dict[str, str]:
    lines = ENV_FILE.splitlines()
    assert lines and all(re.fullmatch(r"[A-Z][A-Z0-9_]*=\S+", line) for line in lines), lines
    return dict(line.split("=", 1) for line in lines)


def test_documented_env_file_names_both_interfaces_and_is_valid_shell(tmp_path):
    expected = _expected_env()
    assert {"NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"} <= set(expected)
    assert expected["NCCL_SOCKET_IFNAME"] == expected["GLOO_SOCKET_IFNAME"]
    # With --no_ssh (and in cluster/pretrain.sbatch) the same file is loaded by the shell.
    (tmp_path / "env").write_text(ENV_FILE)
    shown = subprocess.run(
        ["bash", "-c", f"set -a; . {tmp_path / 'env'}; set +a; env -0"],
        env={"PATH": os.environ["PATH"]}, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    got = dict(item.split("=", 1) for item in shown.split("\0") if "=" in item)
    assert {k: got.get(k) for k in expected} == expected


@pytest.mark.slow
def test_documented_env_file_reaches_every_rank_through_deepspeeds_launcher(tmp_path):
    """Two hosts over the launcher's pdsh path. pdsh's own part — run the command line through each host's shell,
    `%n` standing for the host's index — is played by a local script (there is no SSH here); reading the file,
    quoting the values and starting the ranks is DeepSpeed's."""
    home, bin_dir, out = tmp_path / "home", tmp_path / "bin", tmp_path / "out"
    for d in (home, bin_dir, out):
        d.mkdir()
    (home / ".deepspeed_env").write_text(ENV_FILE)
    (tmp_path / "hosts").write_text("node-1 slots=1\nnode-2 slots=1\n")
    (bin_dir / "pdsh").write_text(
        textwrap.dedent(
            f"""\
            #!{sys.executable}
            import subprocess, sys
            args = sys.argv[1:]
            hosts = args[args.index("-w") + 1].split(",")
            command = " ".join(args[args.index("-w") + 2 :])
            codes = [subprocess.call(["bash", "-c", command.replace("%n", str(i))]) for i in range(len(hosts))]
            sys.exit(max(codes))
            """
        )
    )
    (bin_dir / "pdsh").chmod(0o755)
    names = sorted(_expected_env())
    (tmp_path / "dump_env.py").write_text(
        f"import json, os\n"
        f"open({str(out)!r} + '/rank' + os.environ['RANK'] + '.json', 'w').write("
        f"json.dumps({{k: os.environ.get(k) for k in {names!r}}}))\n"
    )
    env = {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("DS_ENV_FILE", None)
    launched = subprocess.run(
        ["deepspeed", "--hostfile", str(tmp_path / "hosts"), "--no_ssh_check", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(tmp_path / "dump_env.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    seen = {p.name: json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))}
    assert sorted(seen) == ["rank0.json", "rank1.json"]
    assert all(values == _expected_env() for values in seen.values()), seen


# --- README and MULTINODE.md give the same 8-node commands -----------------------------------------------------


def test_readme_eight_node_commands_are_multinode_md_s_verbatim():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Clusters") :]
    section = section[: section.index("\n## ", 1)]
    commands = re.findall(r"```bash\n(deepspeed --hostfile cluster/hosts .*?)```", section, re.S)
    assert (
        len(commands) == 2 and any("s3://" in c for c in commands) and any("/shared/" in c for c in commands)
    )
    for command in commands:
        assert command in MULTINODE, command
    hosts = [
        line for line in (ROOT / "cluster" / "hosts").read_text().splitlines() if not line.startswith("#")
    ]
    assert hosts == [f"node-{i} slots=8" for i in range(1, 9)]
