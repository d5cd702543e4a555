"""What training and memory do differently on a GPU, in one place.

Training on CUDA (``train.device: cuda`` or ``auto`` with a GPU) takes, without settings:

* **bf16 autocast** where the GPU supports it (``train.precision: auto`` or ``bf16``; see
  [`hardware_preset`][cortex.runtime.train.hardware_preset]), chosen by
  [`autocast_dtype`][cortex.runtime.gpu.autocast_dtype] for the device type;
* **fused AdamW** ([`make_optimizer`][cortex.runtime.step.make_optimizer]);
* **NCCL** under ``torchrun`` ([`init_from_env`][cortex.runtime.distributed.init_from_env]), each rank
  on the GPU of its ``LOCAL_RANK``;
* **OOM back-off**: running out of GPU memory halves the micro-batch and doubles the
  accumulation (the training loop).

Switches: ``train.compile`` ([`compile_core`][cortex.runtime.gpu.compile_core]) and
``train.gradient_checkpointing``.

Memory tiers keep FAISS indexes. With FAISS built for GPUs (the ``gpu`` extra) and the model
on CUDA, a tier searches a GPU copy of its index (``SearchMirror`` in the memory plugins);
with faiss-cpu the indexes stay on the CPU, which works, and
[`faiss_note`][cortex.runtime.gpu.faiss_note] says so once per training run.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["autocast_dtype", "compile_core", "faiss_gpus", "faiss_note"]

#: the ``torch.compile`` backend of ``train.compile``
COMPILE_BACKEND = "inductor"


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``: ``None`` for fp32 (no autocast),
    bfloat16 for bf16 on CPUs and on GPUs that run it; a GPU without bf16 is an error."""
    device = torch.device(device)
    if precision == "fp32":
        return None
    if precision != "bf16":
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{torch.cuda.get_device_name(device)} does not support bf16: use precision fp32 or auto")
    return torch.bfloat16


def compile_core(model: Any) -> None:
    """``torch.compile`` the model's transformer core in place (``nn.Module.compile``): its
    parameters and state-dict keys stay as they are, so checkpoints and run directories do
    not change. Generation's cached steps and the memory keys run uncompiled."""
    model.core.compile(backend=COMPILE_BACKEND)


def faiss_gpus() -> int:
    """GPUs the installed FAISS can use: 0 with faiss-cpu (or without a visible GPU)."""
    import faiss

    count = getattr(faiss, "get_num_gpus", None)
    return int(count()) if count is not None and hasattr(faiss, "StandardGpuResources") else 0


def faiss_note(model: Any, device: torch.device | str) -> str | None:
    """A line for a model with memory tiers on CUDA whose FAISS cannot use the GPU, else ``None``."""
    if torch.device(device).type != "cuda" or not getattr(model, "memory", None) or faiss_gpus() > 0:
        return None
    return ("the model runs on CUDA but FAISS has no GPU support (faiss-cpu): memory tiers search their "
            "indexes on the CPU; `pip install 'cortex[gpu]'` puts them on the GPU (see docs/gpu.md)")
