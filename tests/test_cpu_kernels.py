"""The switch of cortex.core.cpu_kernels: the fast CPU paths and the plain PyTorch paths of the
transformer core give the same logits and gradients."""

from __future__ import annotations

import pytest
import torch

from cortex.core import cpu_kernels
from cortex.core.transformer import ModelConfig, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

KERNELS = ("_RMSNormFunction", "_RotaryQKV", "_RotaryAttentionBF16")


def tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 61, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=61, dim=64, layers=2, heads=4, context=32))


def count_kernel_calls(monkeypatch) -> list[str]:
    """Record every call of the hand-written autograd functions."""
    calls: list[str] = []
    for name in KERNELS:
        function = getattr(cpu_kernels, name)
        original = function.apply
        monkeypatch.setattr(function, "apply", lambda *a, _o=original, _n=name: calls.append(_n) or _o(*a))
    return calls


def train_step(model: Transformer, enabled: bool, monkeypatch, bf16: bool = False):
    monkeypatch.setattr(cpu_kernels, "enabled", enabled)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits, loss = model(tokens(3, 32, seed=1), tokens(3, 32, seed=2))
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters()}
    return logits.detach().float(), grads


def test_switch_off_and_on_give_the_same_logits_and_gradients(model, monkeypatch):
    calls = count_kernel_calls(monkeypatch)
    plain_logits, plain = train_step(model, False, monkeypatch)
    assert not calls, "switched off, a kernel still ran"
    fast_logits, fast = train_step(model, True, monkeypatch)
    assert {"_RMSNormFunction", "_RotaryQKV"} <= set(calls)
    torch.testing.assert_close(fast_logits, plain_logits)
    for name in plain:
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_switch_off_and_on_agree_under_bf16_autocast(model, monkeypatch):
    calls = count_kernel_calls(monkeypatch)
    plain_logits, plain = train_step(model, False, monkeypatch, bf16=True)
    assert not calls
    fast_logits, fast = train_step(model, True, monkeypatch, bf16=True)
    if cpu_kernels._flash_backward is not None:
        assert "_RotaryAttentionBF16" in calls
    torch.testing.assert_close(fast_logits, plain_logits, rtol=0.02, atol=0.02)
    for name in plain:  # bf16 rounding: compare whole gradients, as tests/test_model.py does
        error = (fast[name] - plain[name]).norm() / plain[name].norm()
        assert error < 0.02, (name, error.item())


def test_switch_off_and_on_agree_on_cached_generation_and_hidden_states(model, monkeypatch):
    model.eval()
    idx = tokens(2, 24, seed=3)
    results = {}
    for enabled in (False, True):
        monkeypatch.setattr(cpu_kernels, "enabled", enabled)
        with torch.no_grad():
            cache = model.new_cache(2)
            pieces = [model.forward_cached(idx[:, :6], cache, 0), model.forward_cached(idx[:, 6:9], cache, 6)]
            pieces += [model.forward_cached(idx[:, p : p + 1], cache, p) for p in range(9, 24)]
            hidden = model.hidden_states(idx, layer=1, window=4)
        greedy = model.generate(idx[:1, :4], 40, temperature=0)
        results[enabled] = torch.cat(pieces, dim=1), hidden, greedy
    torch.testing.assert_close(results[True][0], results[False][0])
    torch.testing.assert_close(results[True][1], results[False][1])
    assert torch.equal(results[True][2], results[False][2])


def test_entry_points_answer_none_where_they_do_not_apply():
    x = torch.randn(2, 3, 8)
    assert cpu_kernels.rms_norm(x.transpose(1, 2), torch.ones(3), 1e-5) is None  # not contiguous
    assert cpu_kernels.rms_norm(x.double(), torch.ones(8), 1e-5) is None  # dtype differs
    qkv = torch.randn(2, 3, 24, requires_grad=True)
    assert cpu_kernels.causal_attention(qkv, None, 2) is None  # float32: the plain attention
