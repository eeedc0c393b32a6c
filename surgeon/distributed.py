"""Several processes through torch.distributed (docs/distributed.md).

`torchrun --nproc_per_node=K run.py ...` (or SLURM through `+cluster=slurm`) starts K copies of the run; the
process group is made from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
only when WORLD_SIZE > 1: gloo on CPU, NCCL on CUDA. A plain `python run.py` never makes one, and every helper
below is then the identity (one process owns everything). The numeric modules take these helpers as plain
callables (`sum_`), so they stay tensor functions.

What is split: the calibration batches (each rank sums its share of the statistics, `sum_` adds them up on
every rank), the layers' costs and updates (`owners`: each layer on one rank, its results broadcast; the layers
divided by R^3 + C^3 in the first shot and by the seconds each took in the shot before after that; the global
threshold from counts combined with `reduce_ints`), and the evaluation windows (`gather_losses`). Rank 0 writes the record, the checkpoint and W&B.

A failing rank leaves its error in the process group's store (`report_failure`) before it exits; torchrun
stops the other ranks, whose own error (a closed connection, a timeout, SIGTERM) is recorded next to it
(`failure`). Every collective has the timeout `distributed.timeout_s`, so no rank waits for ever.
"""
from __future__ import annotations

import atexit
import os
import signal
from datetime import timedelta

import torch
import torch.distributed as dist

FAILURE_KEY = "surgeon/failure"


class RankStopped(RuntimeError):
    """This rank was told to stop (SIGTERM: torchrun stops all ranks when one fails)."""


def _slurm_tasks() -> int:
    """Tasks of this SLURM job step when it was started by srun (as submitit's launcher does), else 1; an
    allocation's shell (salloc, the batch script) is one process whatever SLURM_NTASKS says."""
    if "SLURM_PROCID" not in os.environ:
        return 1
    return int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))


def _export_slurm_env() -> None:
    """torchrun's variables from SLURM's, through submitit, for the tasks of a job it launched (`+cluster=slurm`
    with hydra.launcher.nodes / tasks_per_node): MASTER_ADDR the first node, MASTER_PORT from the job id."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        from .paths import ConfigError

        raise ConfigError(f"this srun step has {_slurm_tasks()} tasks but no torchrun variables (WORLD_SIZE...): "
                           "launch through the SLURM preset (python run.py -m +cluster=slurm "
                           "hydra.launcher.tasks_per_node=...), or run torchrun inside srun")
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)  # keeps a MASTER_PORT set


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it, else the tasks of an srun step (1 when launched by neither)."""
    return int(os.environ.get("WORLD_SIZE", _slurm_tasks()))


def init(device: torch.device, timeout_s: float) -> bool:
    """Join the process group when launched with WORLD_SIZE > 1 (True), else do nothing (False); the tasks of a
    SLURM job launched by submitit get torchrun's variables from SLURM's first (`_export_slurm_env`)."""
    if env_world_size() <= 1 or dist.is_initialized():
        return dist.is_initialized()
    if "WORLD_SIZE" not in os.environ:
        _export_slurm_env()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    signal.signal(signal.SIGTERM, _stop)
    # joined once per process: the jobs of a `-m` sweep under torchrun reuse the group (a second
    # init_process_group on torchrun's store would wait on the first one's keys for ever)
    atexit.register(close)
    return True


def _stop(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the record of the failure is written undisturbed
    raise RankStopped("stopped by SIGTERM (another rank failed, or the job was cancelled)")


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """This rank's GPU (LOCAL_RANK) when the run is on CUDA; the device unchanged otherwise."""
    if device.type == "cuda" and active():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def share(items: list, part: int | None = None, parts: int | None = None) -> list:
    """This rank's contiguous share of `items` (the first ranks take one more when they do not divide)."""
    part = rank() if part is None else part
    parts = world_size() if parts is None else parts
    size, extra = divmod(len(items), parts)
    start = part * size + min(part, extra)
    return items[start:start + size + (part < extra)]


def owners(work: list[float]) -> list[int]:
    """The rank of each item: longest work first onto the least loaded rank (ties: lower index, lower rank), so
    every rank computes the same assignment."""
    load = [0.0] * world_size()
    out = [0] * len(work)
    for i in sorted(range(len(work)), key=lambda i: (-work[i], i)):
        r = min(range(len(load)), key=lambda r: (load[r], r))
        out[i] = r
        load[r] += work[i]
    return out


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over the ranks, in place, on every rank (the tensor itself in one process)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}


def reduce_ints(values: list[int], op: str) -> list[int]:
    """Integers combined elementwise over the ranks ('sum', 'min' or 'max'), on every rank."""
    if not active():
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, _OPS[op]))
    return tensor.tolist()


def broadcast(tensor: torch.Tensor, src: int) -> torch.Tensor:
    """`tensor` of rank `src` on every rank, in place."""
    if active():
        dist.broadcast(tensor, src=src)
    return tensor


def broadcast_object(obj, src: int = 0):
    """A picklable object of rank `src` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def from_owners(owned: dict, owner: dict, keys: list, device: torch.device) -> dict:
    """Every key's tensor on every rank: each rank gives the tensors of the keys it owns (`owned`), which are
    broadcast from their owner (`owner[key]`) in the order of `keys`, after one exchange of shapes and dtypes."""
    if not active():
        return dict(owned)
    meta = {}
    for part in gather_objects({key: (tuple(t.shape), t.dtype) for key, t in owned.items()}):
        meta.update(part)
    out = {}
    for key in keys:
        shape, dtype = meta[key]
        tensor = owned[key] if owner[key] == rank() else torch.empty(shape, dtype=dtype, device=device)
        out[key] = broadcast(tensor.contiguous(), owner[key])
    return out


def gather_losses(losses: torch.Tensor) -> torch.Tensor:
    """The per-window losses of all ranks' contiguous shares, concatenated in window order."""
    return torch.cat(gather_objects(losses.cpu())) if active() else losses


def report_failure(err: BaseException) -> None:
    """Leave this rank's error in the store (first one wins) for the rank that writes the record."""
    if not active() or isinstance(err, RankStopped):
        return
    try:
        store = dist.distributed_c10d._get_default_store()
        store.compare_set(FAILURE_KEY, "", f"rank {rank()}: {type(err).__name__}: {err}")
    except Exception:  # noqa: BLE001 - the store may be gone with the failing peer; the record keeps this rank's error
        pass


def failure() -> str | None:
    """The error another rank reported, if any (waits at most a few seconds for it)."""
    if not active():
        return None
    try:
        store = dist.distributed_c10d._get_default_store()
        store.wait([FAILURE_KEY], timedelta(seconds=5))
        return store.get(FAILURE_KEY).decode()
    except Exception:  # noqa: BLE001 - nobody reported one, or the store went down
        return None
