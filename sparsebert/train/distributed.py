"""DeepSpeed: the JSON config completed from the training config, distributed init, the engine."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.constants import default_pg_timeout

from sparsebert.train import agreement
from sparsebert.train.config import ConfigError, PretrainConfig

REPO_ROOT = Path(__file__).resolve().parents[2]

# Keys the training config owns; a DeepSpeed JSON that sets them would be a second source of truth.
OWNED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "optimizer",
    "scheduler",
)


def deepspeed_config(config: PretrainConfig) -> dict[str, Any]:
    """The DeepSpeed JSON named by the config, completed with batch size, accumulation and clipping."""
    path = Path(config.deepspeed_config)
    if not path.is_file() and not path.is_absolute():  # the shipped configs, wherever the command runs from
        path = REPO_ROOT / path if (REPO_ROOT / path).is_file() else path
    if not path.is_file():
        raise ConfigError(f"config key 'deepspeed_config': file {str(path)!r} not found")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {err}") from err
    clash = [key for key in OWNED_KEYS if key in ds]
    if clash:
        raise ConfigError(
            f"DeepSpeed config {path} sets {clash[0]!r}; batch sizes, accumulation, clipping, optimizer and "
            "scheduler come from the training config (train.*) only"
        )
    if config.train.optimizer == "lamb" and zero_stage(ds) > 0:
        raise ConfigError(
            f"train.optimizer 'lamb' needs ZeRO stage 0, but {path} uses stage {zero_stage(ds)}: ZeRO hands the "
            "optimizer flat partitions of many parameters, and LAMB's per-layer trust ratio would be computed "
            "over those instead of layers. Use train.optimizer=adamw, or a stage-0 DeepSpeed config"
        )
    if not config.dam.clip_alpha and config.train.grad_clip > 0 and not guards_steps(ds):
        raise ConfigError(
            f"dam.clip_alpha=false needs ZeRO stage 0 without fp16, but {path} uses "
            f"{'fp16' if ds.get('fp16', {}).get('enabled') else f'stage {zero_stage(ds)}'}: there DeepSpeed clips "
            "every gradient itself, α's included. Use a stage-0 DeepSpeed config, or train.grad_clip=0"
        )
    if ds.get("bf16", {}).get("enabled") and config.train.grad_accum_steps > 1 and rank() == 0:
        print(
            f"warning: {path} enables DeepSpeed's bf16 mode, so the {config.train.grad_accum_steps} micro-batches "
            "of a step accumulate their gradients in bf16. The shipped bf16 configs use torch_autocast instead "
            "(fp32 weights and gradient accumulation, bf16 compute)",
            flush=True,
        )
    ds["train_micro_batch_size_per_gpu"] = config.train.micro_batch_size
    ds["gradient_accumulation_steps"] = config.train.grad_accum_steps
    # Where the trainer guards the optimizer steps itself (see guards_steps), it clips too: DeepSpeed's stage-0
    # clipping would discard the gradient norm the run reports.
    ds["gradient_clipping"] = 0.0 if guards_steps(ds) else config.train.grad_clip
    ds.setdefault("steps_per_print", 10**9)  # our own logging reports progress
    # Our optimizers (LAMB from pytorch-optimizer, torch AdamW) are plain torch optimizers that ZeRO runs on
    # its flat partitions; DeepSpeed flags any optimizer it does not ship as "untested". The ZeRO-stage
    # parity test (tests/test_pretrain.py) is what tests it here.
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds


def precision(ds: dict[str, Any]) -> str:
    """How a DeepSpeed config computes and accumulates, in words (printed and logged at start)."""
    autocast = ds.get("torch_autocast", {})
    if autocast.get("enabled"):
        return f"{autocast.get('dtype', 'bfloat16')} autocast, fp32 weights and gradient accumulation"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16 with dynamic loss scaling (skipped steps are counted)"
    if ds.get("bf16", {}).get("enabled"):
        return "bf16 weights and gradient accumulation"
    return "fp32"


def guards_steps(ds: dict[str, Any]) -> bool:
    """True where DeepSpeed's optimizer would neither skip a step with non-finite gradients nor report the
    gradient norm: ZeRO stage 0 without fp16. There the trainer wraps its optimizer in ``optim.GuardedSteps``."""
    return zero_stage(ds) == 0 and not ds.get("fp16", {}).get("enabled")


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def launch_env() -> None:
    """A plain ``python sparsebert/pretrain.py`` (no launcher) is a world of one, on a free port."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))


def init_distributed(store: dist.Store | None) -> None:
    """Form the process group on the rendezvous' ``store`` (``agreement.rendezvous``), with DeepSpeed's collective
    timeout; nothing when this process already has one (tests form a group of one themselves)."""
    if dist.is_initialized():
        return
    world = int(os.environ["WORLD_SIZE"])
    _prepare_shared_memory_op(world)
    backend, local_rank = get_accelerator().communication_backend_name(), int(os.environ["LOCAL_RANK"])
    # As deepspeed.init_distributed would, but on our store: the rendezvous had the short set-up timeout, the
    # group keeps the long one. DeepSpeed then wraps the group it finds.
    extra = {"device_id": torch.device("cuda", local_rank)} if backend == "nccl" and world > 1 else {}
    dist.init_process_group(
        backend,
        store=store,
        rank=int(os.environ["RANK"]),
        world_size=world,
        timeout=default_pg_timeout,
        **extra,
    )
    deepspeed.init_distributed(dist_init_required=True, timeout=default_pg_timeout)
    _unlink_shared_memory_buffer()
    # One device per rank from the start: batches and collectives use it before the engine exists (which
    # would set it too). The CPU accelerator ignores this.
    get_accelerator().set_device(local_rank)


def _prepare_shared_memory_op(world_size: int) -> None:
    """On the CPU accelerator DeepSpeed compiles a C++ shared-memory all-reduce when its communication backend
    starts (about a minute, silent, cached afterwards). A single process has nothing to share: skip it, and gloo
    serves the group of one. Several processes: say what is being built before that silent minute."""
    if get_accelerator().device_name() != "cpu":
        return
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return
    if world_size == 1:
        # DeepSpeed consults this table before building the op; it offers no other switch for it.
        deepspeed.ops.__compatible_ops__[builder.NAME] = False
        return
    from torch.utils.cpp_extension import _get_build_directory

    built = Path(_get_build_directory(builder.NAME, verbose=False)) / f"{builder.NAME}.so"
    if not built.exists() and os.environ.get("LOCAL_RANK", "0") == "0":
        print(
            f"DeepSpeed is compiling its shared-memory all-reduce for CPU ranks ({builder.NAME}, C++): about a "
            f"minute, once; cached in {built.parent.parent}",
            flush=True,
        )


def _unlink_shared_memory_buffer() -> None:
    """Remove the name of this rank's shared-memory all-reduce buffer once every rank has mapped it.

    DeepSpeed never unlinks it: each CPU run under the launcher would leave ~70 MB per rank in /dev/shm (memory,
    not disk) until reboot. The mappings outlive the name, so the all-reduce keeps working."""
    path = Path("/dev/shm") / (
        f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_"
        f"{os.environ['RANK']}"
    )
    if get_accelerator().device_name() == "cpu" and dist.get_world_size() > 1:
        dist.barrier()  # every rank has mapped every buffer once all have returned from init_distributed
        path.unlink(missing_ok=True)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_HF_DS_CONFIG = None


def enable_zero3_init(ds: dict[str, Any]) -> None:
    """Under ZeRO-3, let transformers build models partitioned (``zero.Init``) and initialise them gathered.

    transformers does that for ``from_pretrained`` and ``_from_config`` while an ``HfDeepSpeedConfig``
    is alive; a model built directly inside ``zero.Init`` would try to initialise empty partitions.
    """
    global _HF_DS_CONFIG
    if zero_stage(ds) == 3 and _HF_DS_CONFIG is None:
        from transformers.integrations import HfDeepSpeedConfig

        _HF_DS_CONFIG = HfDeepSpeedConfig(ds)


@contextlib.contextmanager
def models_built_whole():
    """Models transformers builds in this block are whole on this rank, even under ZeRO-3: for work one rank does
    alone (the model card reads the export back), where ``zero.Init``'s collectives would wait for ranks that never
    join them."""
    if _HF_DS_CONFIG is None:
        yield
        return
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(_HF_DS_CONFIG)


def gathered(params, ds: dict[str, Any], modifier_rank: int | None = None):
    """Context in which ZeRO-3 partitioned parameters are whole on every rank (no-op below stage 3)."""
    if zero_stage(ds) == 3:
        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank)
    return contextlib.nullcontext()


def initialize(model, optimizer, scheduler_factory, ds: dict[str, Any]):
    """Wrap model, optimizer and schedule in a DeepSpeed engine."""
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler_factory, config=ds
    )
    return engine, scheduler


def loss_scale(engine) -> float | None:
    """fp16's current dynamic loss scale (None without fp16: bf16 and fp32 need none)."""
    # Every DeepSpeed fp16 optimizer (ZeRO-1/2/3 and the stage-0 ones) exposes it as `loss_scale`.
    return float(engine.optimizer.loss_scale) if engine.fp16_enabled() else None


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def device() -> torch.device:
    """This rank's accelerator device (``cuda:<local rank>`` on GPUs, ``cpu`` on CPU ranks).

    Batches go there, and so does every tensor handed to a collective: NCCL rejects CPU tensors.
    """
    return torch.device(get_accelerator().current_device_name())


def all_mean(values: torch.Tensor) -> torch.Tensor:
    """Average a tensor of metrics over ranks (one all-reduce; the tensor stays on its device).

    A world of one still goes through the collective, so a single-GPU run exercises the same path.
    """
    if not dist.is_initialized():
        return values
    reduced = values.clone()
    dist.all_reduce(reduced)
    return reduced / world_size()


_CONTROL_GROUP = None


def destroy_process_group() -> None:
    """Leave the process group, and forget what was made for it (our control group, DeepSpeed's clone of the world,
    the ZeRO-3 config transformers builds models under), so that a process forming a new group — tests do — starts
    clean."""
    global _CONTROL_GROUP, _HF_DS_CONFIG
    from deepspeed.utils import groups

    if dist.is_initialized():
        dist.destroy_process_group()
    agreement.forget()
    _CONTROL_GROUP = None
    _HF_DS_CONFIG = None  # transformers holds it weakly: dropped here, models build unpartitioned again
    groups._WORLD_GROUP = None  # DeepSpeed keeps it across groups and offers no reset


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any rank: a host-side agreement (a stop request, an error on
    one rank) through a gloo group, so it never waits on the device's queue of work."""
    global _CONTROL_GROUP
    if not dist.is_initialized():
        return flag
    if _CONTROL_GROUP is None:  # created by every rank at its first agreement, as new_group requires
        _CONTROL_GROUP = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    vote = torch.tensor([int(flag)])
    dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=_CONTROL_GROUP)
    return bool(vote.item())


def same_on_all_ranks(tensor: torch.Tensor) -> bool:
    """True when every rank holds an identical tensor (checked against rank 0's copy)."""
    if not dist.is_initialized():
        return True
    local = tensor.to(torch.int32)  # gloo has no bool collectives
    reference = local.clone()
    dist.broadcast(reference, src=0)
    mismatch = (reference != local).any().to(torch.int32).reshape(1)  # on the tensor's own device
    dist.all_reduce(mismatch)
    return bool(mismatch.item() == 0)
