"""Training and memory on a GPU: bf16 autocast, fused AdamW, torch.compile, gradient
checkpointing, OOM back-off, FAISS without GPU support, run directories across devices.

The tests marked ``gpu`` need CUDA and are skipped without it (tests/conftest.py, with the
reason); ``scripts/gpu-check`` runs them on a GPU machine. The others run here on the CPU.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

import cortex.runtime.gpu as gpu
from cortex.assembly import assemble
from cortex.kernel.manifest import TrainSection, load_manifest
from cortex.runtime.rundir import load_run, save_run
from cortex.runtime.step import _autocast, make_optimizer
from cortex.runtime.train import resolve_device, train
from tests.test_train import manifest_text, new_run, read_metrics, settings, write_corpus

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
MEMORY = [{"type": "stm", "settings": {"capacity": 32}}, {"type": "ltm", "settings": {"capacity": 512}}]


def test_autocast_dtype_is_chosen_per_precision_and_device():
    assert gpu.autocast_dtype("fp32", "cpu") is None
    assert gpu.autocast_dtype("bf16", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="fp32 or bf16"):
        gpu.autocast_dtype("fp16", "cpu")
    layer = torch.nn.Linear(4, 4)
    with _autocast("bf16", torch.device("cpu")):
        assert layer(torch.ones(1, 4)).dtype is torch.bfloat16
    with _autocast("fp32", torch.device("cpu")):
        assert layer(torch.ones(1, 4)).dtype is torch.float32


def test_the_compile_switch_is_off_by_default_and_validated(tmp_path):
    assert TrainSection().compile is False and TrainSection(compile=True).compile is True
    with pytest.raises(ValidationError, match="compile"):
        TrainSection.model_validate({"compile": "sometimes"})
    path = tmp_path / "m.yaml"
    path.write_text(manifest_text(train={"compile": True}), encoding="utf-8")
    assert load_manifest(path).manifest.train.compile is True


def test_compiled_training_makes_the_updates_of_eager_training(tmp_path, monkeypatch):
    # the "eager" backend traces the core with TorchDynamo as inductor does, without its
    # C++ code generation (minutes on this CPU); the GPU test below compiles with inductor
    monkeypatch.setattr(gpu, "COMPILE_BACKEND", "eager")
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    weights = []
    for name, flag in (("eager", False), ("compiled", True)):
        model, run = new_run(tmp_path, manifest_text(), name=name)
        train(model, run, settings(compile=flag), data=str(corpus), steps=3)
        assert (getattr(model.core, "_compiled_call_impl", None) is not None) is flag
        weights.append(torch.cat([p.detach().flatten() for p in model.core.parameters()]))
    torch.testing.assert_close(weights[0], weights[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path, device):
    path = tmp_path / "m.yaml"
    path.write_text(manifest_text(layers=3), encoding="utf-8")
    model = assemble(load_manifest(path), device=device).train()
    batch = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(0)).to(device)
    results = []
    for flag in (False, True):
        model.core.gradient_checkpointing = flag
        model.zero_grad(set_to_none=True)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.core.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_a_memory_model_on_cuda_without_faiss_gpu_says_so_once(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(manifest_text(memory=MEMORY), encoding="utf-8")
    model = assemble(load_manifest(path))
    assert gpu.faiss_note(model, "cpu") is None  # on the CPU there is nothing to say
    if gpu.faiss_gpus() > 0:
        assert gpu.faiss_note(model, "cuda") is None
    else:  # faiss-cpu, as installed here
        note = gpu.faiss_note(model, "cuda")
        assert "faiss-cpu" in note and "cortex[gpu]" in note
    path.write_text(manifest_text(), encoding="utf-8")
    assert gpu.faiss_note(assemble(load_manifest(path)), "cuda") is None  # no tiers: nothing to search


# --------------------------------------------------------------------------- on a GPU


def cuda_run(tmp_path, text: str, name: str = "run"):
    """Assemble a manifest on the GPU (tiers included) and write its run directory."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    model = assemble(load_manifest(path), device=resolve_device("cuda"))
    return model, save_run(model, tmp_path / "runs", name=name)


@pytest.mark.gpu
def test_cuda_training_uses_bf16_fused_adamw_and_compile_and_learns(tmp_path):
    model, run = cuda_run(tmp_path, manifest_text(layers=2, memory=MEMORY))
    optimizer = make_optimizer(model, lr=1e-3)
    assert optimizer.defaults["fused"] is True
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    summary = train(model, run, settings(precision="auto", compile=True, lr=3e-3), data=str(corpus), steps=40)
    lines, _ = read_metrics(run)
    assert summary["precision"] == "bf16" and summary["device"].startswith("cuda")
    assert model.core._compiled_call_impl is not None
    assert lines[-1]["loss"] < 0.5 * lines[0]["loss"]


@pytest.mark.gpu
def test_a_real_out_of_memory_on_the_gpu_halves_the_micro_batch(tmp_path):
    model, run = cuda_run(tmp_path, manifest_text(layers=2, context=512, dim=256, heads=4))
    corpus = write_corpus(tmp_path / "corpus.jsonl", docs=3000)
    free, _ = torch.cuda.mem_get_info()
    # hold all but ~0.5 GiB: a micro-batch of 64 sequences of 512 cannot fit, a few can
    ballast = torch.empty(max(0, free - (512 << 20)), dtype=torch.uint8, device="cuda")
    try:
        summary = train(model, run, settings(batch=64, micro_batch=64, precision="fp32"), data=str(corpus), steps=2)
    finally:
        del ballast
        torch.cuda.empty_cache()
    _, events = read_metrics(run)
    backoffs = [e for e in events if e["event"] == "oom_backoff"]
    assert backoffs and summary["micro_batch"] < 64 and summary["steps"] == 2


@pytest.mark.gpu
def test_a_run_trained_on_the_gpu_loads_on_the_cpu_with_its_memory(tmp_path):
    model, run = cuda_run(tmp_path, manifest_text(memory=MEMORY))
    train(model, run, settings(), data=str(write_corpus(tmp_path / "corpus.jsonl")), steps=3)
    on_cpu = load_run(run, device="cpu")
    assert len(on_cpu.memory[0]) > 0 and next(on_cpu.core.parameters()).device.type == "cpu"
    on_gpu = load_run(save_run(on_cpu, tmp_path / "runs", name="back"), device="cuda")
    for tier_gpu, tier_cpu in zip(on_gpu.memory, on_cpu.memory):
        assert len(tier_gpu) == len(tier_cpu) > 0
        for key, value in tier_cpu.state_dict().items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(tier_gpu.state_dict()[key].cpu(), value), key
    assert on_gpu.remember("The gate code is 4821.") > 0  # writes on the GPU too
    assert on_gpu.generate(torch.tensor([[1, 2, 3]], device="cuda"), 8, temperature=0.0).shape == (1, 11)


def test_the_gpu_check_script_runs_its_tests_part_on_the_cpu(tmp_path):
    script = Path(__file__).resolve().parent.parent / "scripts" / "gpu-check"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    done = subprocess.run([str(script), "--dry-run", "--only", "tests"], capture_output=True, text=True,
                          env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = (tmp_path / "summary.txt").read_text()
    assert "mode dry" in summary and re.search(r"^tests\s+rc=0 ", summary, re.M), summary
    assert "throughput" not in summary  # --only: one part
    assert "needs a CUDA GPU" in (tmp_path / "tests.log").read_text()  # skipped, with the reason
