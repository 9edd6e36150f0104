"""The process layer: one code path for 1 and N ranks; every collective on the process group's device.

accelerate's `PartialState` joins the launcher's process group (torchrun, `launch/srun_tasks.sh`, the
DeepSpeed launcher, `accelerate launch`: all set RANK / WORLD_SIZE / LOCAL_RANK) and picks the device,
cuda:(LOCAL_RANK mod visible GPUs), so one GPU per task and all GPUs per task both work; gloo on CPU.
A process started without a launcher joins a world of one, so DeepSpeed and the loop run exactly the
code they run on eight ranks.

Every tensor collective goes through `_collective`, which refuses a tensor that is not on the device
the backend communicates from (NCCL: CUDA only) — tensors are made on `comm_device()` here, so a CPU
tensor can never reach NCCL. Object collectives (gather/broadcast) are accelerate's, on the current device.

Refusals are rank-symmetric: `agree` runs a check on every rank and `decide_on_main` runs it once on
rank 0; either way every rank raises the same one-line error, fast, instead of one rank printing it
and the others waiting in a collective until the process-group timeout.

Two timeouts. The process group's (`train.pg_timeout_minutes`, default 10) bounds how long a rank waits
for a peer that died: short, to fail fast. Long disk work (rank 0 exporting a 10 GB student, pruning it
between stages, committing a checkpoint of ~60 GB on a shared filesystem) must not run inside such a
wait, so ranks waiting for it wait on a second, gloo group (`barrier(slow=True)`,
`decide_on_main(..., slow=True)`) bounded by `train.io_timeout_minutes` (default 120) instead.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from .errors import UserError

T = TypeVar("T")
# The device type a backend's tensors must live on (gloo also takes CUDA tensors, by copying).
COMM_DEVICE = {"nccl": "cuda", "gloo": "cpu"}
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_RUNTIME: Runtime | None = None
_SLOW_GROUP = None  # gloo, long timeout: waits for rank 0's disk work (see the module docstring)
if not torch.cuda.is_available():  # say it, so DeepSpeed does not warn on every rank that it "was unable to detect" a GPU
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
_SOLO_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_SET_BY_US: list[str] = []


def free_port() -> int:
    """A free TCP port on this host, for a rendezvous started here."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(timeout_minutes: float = 10.0, io_timeout_minutes: float = 120.0) -> Runtime:
    """Join (or, alone, create) the process group; idempotent. `timeout_minutes` bounds how long a rank
    waits in a collective for a peer that died; `io_timeout_minutes` how long it waits for rank 0's disk work."""
    global _RUNTIME, _SLOW_GROUP
    if _RUNTIME is not None:
        return _RUNTIME
    from accelerate import PartialState

    if "WORLD_SIZE" not in os.environ:  # no launcher: a world of one, same code path
        solo = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        _SET_BY_US[:] = [k for k in _SOLO_ENV if k not in os.environ]
        os.environ.update({k: solo[k] for k in _SET_BY_US})
    cuda = torch.cuda.is_available()
    state = PartialState(cpu=not cuda, timeout=datetime.timedelta(minutes=timeout_minutes))
    if cuda:
        torch.cuda.set_device(state.device)
    _join_deepspeed(cuda)
    if state.num_processes > 1:  # every rank creates it, in the same order
        _SLOW_GROUP = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=io_timeout_minutes))
    _RUNTIME = Runtime(state.process_index, state.num_processes, state.local_process_index, state.device,
                       dist.get_backend())
    return _RUNTIME


def _join_deepspeed(cuda: bool) -> None:
    """Let DeepSpeed's comm layer wrap the group that exists (it would otherwise create its own)."""
    import deepspeed

    if not cuda:
        # On CPU DeepSpeed JIT-compiles a shared-memory all-reduce kernel at init, under a file lock in
        # ~/.cache/torch_extensions; a rank killed while holding it leaves every later job waiting on the
        # lock forever (seen under Slurm). gloo does the same collectives; skip the kernel.
        import importlib

        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)


def set_deterministic(on: bool) -> None:
    """train.deterministic: deterministic CUDA kernels, so a resumed run repeats the uninterrupted one bit
    for bit on a GPU too -- on the same GPU model, driver, CUDA, torch and DeepSpeed versions only (CPU kernels
    are deterministic already). cuBLAS needs a fixed workspace, set before its first call; an op with no
    deterministic kernel then raises instead of varying silently."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def set_tf32(on: bool, device: torch.device) -> None:
    """train.tf32: float32 matmuls and convolutions on TF32 tensor cores (10-bit mantissa, several times the
    float32 throughput on Ampere and later). Set both ways on CUDA, so a run in this process after a TF32 one
    is plain float32 again (cuDNN's own default is TF32 on); CPU kernels have no TF32: a no-op there."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


def initialized() -> bool:
    return _RUNTIME is not None


def my_share(n: int) -> list[int]:
    """This rank's contiguous share of range(n) (accelerate's split_between_processes); all of it alone."""
    if _RUNTIME is None or _RUNTIME.world_size == 1:
        return list(range(n))
    from accelerate import PartialState

    with PartialState().split_between_processes(list(range(n))) as mine:
        return list(mine)


def get() -> Runtime:
    if _RUNTIME is None:
        raise RuntimeError("runtime.init() has not been called")
    return _RUNTIME


def comm_device() -> torch.device:
    """Where collective tensors are made: the rank's CUDA device under NCCL, CPU under gloo."""
    rt = get()
    return rt.device if COMM_DEVICE.get(rt.backend, rt.device.type) == rt.device.type else torch.device("cpu")


def check_comm_device(t: torch.Tensor, backend: str) -> None:
    """The guard every tensor collective passes: NCCL takes CUDA tensors only (it fails at run time with
    "No backend type associated with device type cpu" otherwise)."""
    need = COMM_DEVICE.get(backend)
    if need is not None and t.device.type != need:
        raise RuntimeError(f"collective on a {t.device.type} tensor, but the {backend} backend needs {need} tensors")


def _collective(fn: Callable, t: torch.Tensor, group=None, **kw) -> None:
    check_comm_device(t, get().backend if group is None else dist.get_backend(group))
    fn(t, group=group, **kw)


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Reduce a few floats across ranks (float64 on the communication device)."""
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    if get().world_size > 1:
        _collective(dist.all_reduce, t, op=_OPS[op])
    return t.tolist()


def all_reduce_to_host(t: torch.Tensor, op: str = "sum") -> list[float]:
    """Sum (or max/min) a small tensor already on `comm_device()` across ranks, then read it on the host:
    the caller's one device-to-host sync (the training loop's only one per optimizer step)."""
    if get().world_size > 1:
        _collective(dist.all_reduce, t, op=_OPS[op])
    return t.tolist()


def barrier(slow: bool = False) -> None:
    """Wait for every rank. slow=True: on the gloo group bounded by io_timeout_minutes, for waits on rank 0's
    disk work (export, pruning, checkpoint commit), so a slow filesystem does not trip the short timeout."""
    if slow:
        if _SLOW_GROUP is not None:
            _collective(dist.all_reduce, torch.zeros(1), group=_SLOW_GROUP)
        return
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def gather_object(obj: Any) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if _RUNTIME is None or _RUNTIME.world_size == 1:
        return [obj]
    from accelerate.utils import gather_object as _gather

    return _gather([obj])


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if get().world_size == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj])[0]


def _outcome(fn: Callable[[], T]) -> tuple[T | None, tuple | None]:
    try:
        return fn(), None
    except UserError as e:
        return None, (type(e), str(e))


def _raise_first(errors: list) -> None:
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        cls, message = first
        error = cls(message)
        error.symmetric = True  # raised on every rank at the same point: the CLI may leave the group cleanly
        raise error


def agree(check: Callable[[], T]) -> T:
    """Run `check` on every rank; if it refused on any rank, every rank raises that (lowest rank's) error."""
    result, error = _outcome(check)
    _raise_first(gather_object(error))
    return result


def decide_on_main(fn: Callable[[], T], slow: bool = False) -> T:
    """Run `fn` on rank 0 only (expensive or rank-0-only checks); every rank gets its result or its error.
    slow=True for long disk work: the others wait in `barrier(slow=True)`, not in the broadcast."""
    rt = get()
    result, error = _outcome(fn) if rt.is_main else (None, None)
    if slow:
        barrier(slow=True)
    result, error = broadcast_object((result, error))
    _raise_first([error])
    return result


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches the process groups it derives in module globals; after the group is destroyed
    they would name a dead group in the next run of this process."""
    from deepspeed.utils import groups

    for name, value in list(vars(groups).items()):
        if name.startswith("_") and name.isupper() and isinstance(value, (dict, dist.ProcessGroup)):
            setattr(groups, name, {} if isinstance(value, dict) else None)
    groups.mpu = None


def shutdown(clean: bool) -> None:
    """Leave the process group after a clean finish, a checkpointed stop or a rank-symmetric refusal: a process that exits with
    gloo's worker threads alive aborts in teardown ("terminate called without an active exception",
    pytorch/pytorch#190489). After an error peers may be inside a collective where a destroy can hang;
    then the process just exits with its status."""
    global _RUNTIME, _SLOW_GROUP
    if _RUNTIME is None:
        return
    _SLOW_GROUP = None  # destroyed with the default group below (or dropped with the process)
    if clean and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    from accelerate import PartialState

    PartialState._reset_state()  # a later init in this process (tests, the demo) starts afresh
    _forget_deepspeed_groups()
    for key in _SET_BY_US:
        os.environ.pop(key, None)
    _RUNTIME = None
