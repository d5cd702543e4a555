"""Multi-process training through ``torchrun``: tiny helpers around ``torch.distributed``.

``torchrun --nproc-per-node 2 -m cortex.cli.app train RUN`` starts one process per rank with
``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` set;
[`init_from_env`][cortex.runtime.distributed.init_from_env] joins the process group (gloo on CPU,
nccl on CUDA). Without those variables every helper is a no-op, so single-process code
needs no special case.

What stays consistent across ranks, and how:

* **gradients** — the training loop wraps the model in ``DistributedDataParallel`` for the
  step, which averages them;
* **data** — every rank reads its own rows of the same global batch (its lanes);
* **non-gradient state** — plasticity rules, memory statistics, running averages and
  anything else a plugin changes outside backprop is *not* synchronised by DDP. A plugin
  whose updates depend on the data a rank saw must reconcile them itself at step end
  (``cortex_after_step``) with [`all_reduce_mean`][cortex.runtime.distributed.all_reduce_mean]
  (e.g. a Hebbian update averaged over ranks) or
  [`broadcast_`][cortex.runtime.distributed.broadcast_] (rank 0's value wins), otherwise the ranks'
  weights drift apart;
* **per-rank state** — what a rank keeps of the data it saw itself (the memory of its
  lanes, the episodes of its rows) legitimately differs between ranks. A checkpoint keeps
  every rank's own plugin state and RNG: the ranks hand theirs to rank 0
  ([`gather_object`][cortex.runtime.distributed.gather_object]), which writes them beside its own,
  and each rank restores its own on resume (see [`cortex.runtime.checkpoint`][cortex.runtime.checkpoint]);
* **memory shared across ranks** — each rank's tiers hold its own lanes' entries. To read
  one memory sharded over ranks (or machines), every rank searches its own index with the
  same queries and [`all_gather_topk`][cortex.runtime.distributed.all_gather_topk] merges the
  ranks' top-k into the global top-k, the same on every rank (see the memory concepts page);
* **files** — only rank 0 writes checkpoints, metrics and the run directory
  ([`is_main`][cortex.runtime.distributed.is_main]); the others wait at a
  [`barrier`][cortex.runtime.distributed.barrier] and read what it wrote.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cortex.kernel.interfaces import all_reduce_mean

__all__ = [
    "DistInfo",
    "all_gather_topk",
    "all_reduce_floats",
    "all_reduce_mean",
    "barrier",
    "broadcast_",
    "destroy",
    "finish",
    "gather_object",
    "init_from_env",
    "is_distributed",
    "is_main",
    "rank",
    "world_size",
    "wrap",
]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    """Whether a process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes files and logs."""
    return rank() == 0


def init_from_env(device: str | torch.device | None = None) -> DistInfo:
    """Join the process group ``torchrun`` describes in the environment, once.

    Uses nccl when ``device`` is CUDA (and sets this rank's GPU from ``LOCAL_RANK``), gloo
    otherwise. Without ``WORLD_SIZE`` > 1 in the environment nothing happens.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or not dist.is_available():
        return DistInfo()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device is not None and torch.device(device).type == "cuda"
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dist.get_backend())


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank ``src``'s value; a no-op in a single process."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def all_reduce_floats(values: list[float]) -> list[float]:
    """The mean over ranks of each number (for logging and decisions every rank must share)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    all_reduce_mean(t)
    return t.tolist()


def gather_object(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0, in rank order (``None`` on the other ranks).

    Pickled through the process group: pass CPU tensors (a CUDA tensor would be rebuilt on
    the sender's device number). ``[obj]`` in a single process.
    """
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather_topk(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global top-``k`` of every rank's own top-``k``: (scores, ids), each (Q, k).

    Every rank passes its shard's best ``scores`` and ``ids`` (Q, k') for the same Q queries
    (higher is better; ``-inf`` / -1 where a shard has fewer); ids must be unique across
    ranks (e.g. an id range per rank). Equal scores are ordered by id, so the result is the
    same on every rank and equals one search over all shards. A single process returns its
    own best ``k``.
    """
    if is_distributed():
        width = torch.tensor([scores.shape[1]], dtype=torch.long)
        dist.all_reduce(width, op=dist.ReduceOp.MAX)  # shards may hold fewer than k entries
        pad = int(width) - scores.shape[1]
        scores = torch.cat([scores, scores.new_full((scores.shape[0], pad), -float("inf"))], 1)
        ids = torch.cat([ids, ids.new_full((ids.shape[0], pad), -1)], 1)
        parts_s = [torch.empty_like(scores) for _ in range(dist.get_world_size())]
        parts_i = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
        dist.all_gather(parts_s, scores.contiguous())
        dist.all_gather(parts_i, ids.contiguous())
        scores, ids = torch.cat(parts_s, 1), torch.cat(parts_i, 1)
    by_id = torch.argsort(ids, dim=1, stable=True)  # ties: smaller id first
    scores, ids = torch.gather(scores, 1, by_id), torch.gather(ids, 1, by_id)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    return torch.gather(scores, 1, order), torch.gather(ids, 1, order)


def barrier() -> None:
    """Wait for every rank; a no-op in a single process."""
    if is_distributed():
        dist.barrier()


def wrap(module: nn.Module, *, find_unused_parameters: bool = False) -> nn.Module:
    """``module`` in ``DistributedDataParallel`` when distributed, else ``module`` itself.

    Buffers are not synchronised at every forward (memory and plugin state is reconciled
    by the plugins, see the module docs). ``find_unused_parameters`` allows parameters that
    a forward does not use (at the cost of a graph traversal per step); the training loop
    turns it on for models with memory tiers.
    """
    if not is_distributed():
        return module
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    device = next(module.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    options = inspect.signature(DistributedDataParallel).parameters
    sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in options else {"broadcast_buffers": False}
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused_parameters, **sync)


def finish() -> None:
    """End a ``torchrun`` process once its work is written: leave the process group with
    every rank, flush the output and exit at once. gloo's threads can abort a process during
    the interpreter's own exit (SIGABRT, "terminate called without an active exception") after
    everything is done; ``os._exit`` skips the C++ static destructors where that race lives.
    Outside ``torchrun``: nothing."""
    if dist.is_available() and dist.is_initialized():
        destroy()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def destroy() -> None:
    """Leave the process group (if this process joined one), once every rank has got here.

    The barrier keeps a rank from tearing its connections down while another still sends.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
