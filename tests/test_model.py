"""Tests of the transformer core (cortex.core.transformer) and the frozen reference GPT."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cortex.core.transformer import KVCache, ModelConfig, Transformer, apply_rope, rope_frequencies
from cortex.bench.reference import ReferenceGPT, comparable_parameters


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(**overrides) -> ModelConfig:
    settings = dict(vocab_size=61, dim=32, layers=2, heads=4, context=16)
    settings.update(overrides)
    return ModelConfig(**settings)


@pytest.fixture
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny()).eval()


def tokens(batch: int, length: int, vocab: int = 61, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(dim=30, heads=4), "divisible"),
        (dict(dim=12, heads=4), "even"),
        (dict(memory_layers=(2,)), "memory_layers"),
        (dict(memory_layers=(-1,)), "memory_layers"),
        (dict(memory_layers=(0, 0)), "duplicates"),
        (dict(context=0), "context"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_config_accepts_memory_layers_list():
    assert tiny(memory_layers=[0, 1]).memory_layers == (0, 1)


# ------------------------------------------------------------------- forward/backward


def test_forward_shapes_and_initial_loss(model):
    idx = tokens(3, 16)
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 61)
    assert loss is None
    logits, loss = model(idx, tokens(3, 16, seed=5))
    assert loss.shape == ()
    assert abs(loss.item() - math.log(61)) < 0.15


def test_shorter_sequences_and_too_long(model):
    logits, _ = model(tokens(2, 5))
    assert logits.shape == (2, 5, 61)
    with pytest.raises(ValueError, match="context"):
        model(tokens(1, 17))


def test_ignore_index(model):
    idx = tokens(2, 8)
    targets = idx.clone()
    targets[:, :4] = -1
    logits, loss = model(idx, targets)
    expected = nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 61), idx[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = Transformer(tiny())
    _, loss = model(tokens(2, 16), tokens(2, 16, seed=2))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_tied_embeddings(model):
    assert model.lm_head.weight is model.tok_emb.weight
    names = [name for name, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # counted once


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    model = Transformer(tiny(dim=64, layers=8))
    assert abs(model.blocks[0].mlp.fc.weight.std().item() - 0.02) < 0.002
    expected = 0.02 / math.sqrt(16)
    assert abs(model.blocks[0].mlp.proj.weight.std().item() - expected) < 0.001
    assert abs(model.blocks[0].attn.proj.weight.std().item() - expected) < 0.001


def test_rmsnorm_matches_torch():
    torch.manual_seed(0)
    from cortex.core.transformer import RMSNorm

    ours = RMSNorm(24, eps=1e-5)
    ref = nn.RMSNorm(24, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
    x1 = torch.randn(3, 5, 24, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    g = torch.randn(3, 5, 24)
    ours(x1).backward(g)
    ref(x2).backward(g)
    torch.testing.assert_close(ours(x1), ref(x2))
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    assert set(ours.state_dict()) == set(ref.state_dict())


def test_bf16_autocast_forward_backward():
    torch.manual_seed(0)
    model = Transformer(tiny())
    idx = tokens(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        fp32_loss = model(idx, idx)[1]
    assert abs(loss.item() - fp32_loss.item()) < 0.05


def test_bf16_cpu_attention_path_matches_sdpa(monkeypatch):
    """bf16 training on CPU takes a fused path (flash forward in bf16, backward in float32);
    it must give the loss and, within bf16 precision, the gradients of the plain path."""
    import cortex.core.cpu_kernels as core

    torch.manual_seed(0)
    model = Transformer(tiny(dim=64, context=32))
    idx, targets = tokens(3, 32), tokens(3, 32, seed=4)

    def run(fast: bool):
        model.zero_grad()
        if not fast:
            monkeypatch.setattr(core, "_use_bf16_cpu_attention", lambda qkv: False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(idx, targets)
        loss.backward()
        monkeypatch.undo()
        return loss.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters()}

    calls = []
    original = core._RotaryAttentionBF16.apply
    monkeypatch.setattr(core._RotaryAttentionBF16, "apply", lambda *a: calls.append(1) or original(*a))
    fast_loss, fast = run(True)
    assert calls, "the fused path was not taken"
    plain_loss, plain = run(False)
    torch.testing.assert_close(fast_loss, plain_loss)
    for name in fast:
        error = (fast[name] - plain[name]).norm() / plain[name].norm()
        assert error < 0.02, (name, error.item())


def test_num_parameters(model):
    cfg = model.config
    per_block = 2 * cfg.dim + 4 * cfg.dim * cfg.dim + 2 * cfg.dim * cfg.hidden_dim
    expected = cfg.vocab_size * cfg.dim + cfg.layers * per_block + cfg.dim
    assert model.num_parameters() == expected
    assert model.num_parameters(exclude_embeddings=True) == expected - cfg.vocab_size * cfg.dim


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = Transformer(tiny(dropout=0.5))
    idx = tokens(2, 16)
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    torch.testing.assert_close(model(idx)[0], model(idx)[0])


# ------------------------------------------------------------------------------- RoPE


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    head_dim = 16
    freqs = rope_frequencies(head_dim, 64)
    q = torch.randn(head_dim)
    k = torch.randn(head_dim)

    def score(m: int, n: int) -> float:
        x = torch.stack([q, k]).view(1, 2, 1, head_dim)  # (B, T, n, hd)
        rq = apply_rope(x[:, :1], freqs[m : m + 1])
        rk = apply_rope(x[:, 1:], freqs[n : n + 1])
        return float((rq * rk).sum())

    for offset in (0, 3, 17, 40):
        assert score(5 + offset, 2 + offset) == pytest.approx(score(5, 2), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(9, 2), abs=1e-3)
    # rotation keeps norms
    x = torch.randn(1, 64, 3, head_dim)
    torch.testing.assert_close(apply_rope(x, freqs).norm(dim=-1), x.norm(dim=-1))


def _logits_at(model: Transformer, idx: torch.Tensor, start: int) -> torch.Tensor:
    """Full causal forward of ``idx`` as if it sat at positions start..start+T-1."""
    x = model.tok_emb(idx)
    rope = model._rope(start, start + idx.size(1))
    for block in model.blocks:
        x = block(x, rope)
    return model.lm_head(model.norm(x))


def test_model_is_translation_invariant(model):
    """With RoPE only relative positions matter: the same tokens give the same logits
    wherever they sit (absolute position embeddings would change them)."""
    idx = tokens(2, 6)
    with torch.no_grad():
        base = _logits_at(model, idx, 0)
        torch.testing.assert_close(base, model(idx)[0])
        for start in (1, 5, 10):
            torch.testing.assert_close(_logits_at(model, idx, start), base, atol=1e-4, rtol=1e-4)
    # the reference GPT, with learned absolute positions, is not translation invariant
    torch.manual_seed(0)
    ref = ReferenceGPT(tiny()).eval()
    with torch.no_grad():
        ref.wpe.weight.normal_()  # make positions matter
        x = ref.wte(idx)
        outs = []
        for start in (0, 5):
            h = x + ref.wpe(torch.arange(start, start + 6))
            for block in ref.h:
                h = block(h)
            outs.append(ref.lm_head(ref.ln_f(h)))
    assert not torch.allclose(outs[0], outs[1], atol=1e-3)


def test_fused_rotary_matches_plain_autograd():
    from cortex.core.cpu_kernels import _RotaryQKV
    from cortex.core.transformer import RopeTables

    torch.manual_seed(0)
    B, T, H, hd = 2, 7, 3, 8
    freqs = rope_frequencies(hd, T)
    rope = RopeTables.build(freqs, H)
    for dtype, in_place in ((torch.float32, False), (torch.float32, True), (torch.bfloat16, False)):
        qkv = torch.randn(B, T, 3 * H * hd, dtype=dtype, requires_grad=True)
        weights = [torch.randn(B, H, T, hd, dtype=dtype) for _ in range(3)]
        projected = qkv * 1.0  # a fresh non-leaf, as a linear layer's output would be
        q, k, v = _RotaryQKV.apply(projected, rope.rotate, rope.unrotate, H, in_place)
        assert in_place == (q.data_ptr() == projected.data_ptr())  # rotated inside qkv or copied
        sum((t * w).sum() for t, w in zip((q, k, v), weights)).backward()
        fused_grad = qkv.grad.clone()
        qkv.grad = None
        parts = [t.unflatten(-1, (H, hd)) for t in qkv.split(H * hd, dim=-1)]
        q2 = apply_rope(parts[0], freqs).transpose(1, 2)
        k2 = apply_rope(parts[1], freqs).transpose(1, 2)
        v2 = parts[2].transpose(1, 2)
        sum((t * w).sum() for t, w in zip((q2, k2, v2), weights)).backward()
        for a, b in zip((q, k, v, fused_grad), (q2, k2, v2, qkv.grad)):
            torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- KV cache


def test_cached_logits_match_full_forward(model):
    idx = tokens(2, 16)
    with torch.no_grad():
        full = model(idx)[0]
        cache = model.new_cache(2)
        pieces = [model.forward_cached(idx[:, :5], cache, 0)]  # prefill
        pieces.append(model.forward_cached(idx[:, 5:8], cache, 5))  # a chunk at an offset
        for pos in range(8, 16):  # then one token at a time
            pieces.append(model.forward_cached(idx[:, pos : pos + 1], cache, pos))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-4)
    assert cache.length == 16


def test_cache_rejects_bad_positions(model):
    cache = model.new_cache(1)
    with torch.no_grad():
        model.forward_cached(tokens(1, 4), cache, 0)
        with pytest.raises(ValueError, match="gap"):
            model.forward_cached(tokens(1, 1), cache, 6)
        with pytest.raises(ValueError, match="context"):
            model.forward_cached(tokens(1, 2), cache, 15)
        with pytest.raises(ValueError, match="batch"):
            model.forward_cached(tokens(2, 1), cache, 4)
    assert isinstance(cache, KVCache)


def test_greedy_generate_equals_full_recomputation(model):
    prompt = tokens(2, 4)
    out = model.generate(prompt, 10, temperature=0)
    assert out.shape == (2, 14)
    assert torch.equal(out[:, :4], prompt)
    seq = prompt
    with torch.no_grad():
        for _ in range(10):
            nxt = model(seq)[0][:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_generate_beyond_context(model):
    """The window slides: when the cache is full it restarts from the last context//2
    tokens. The cached result equals full recomputation of the same windows."""
    context = model.config.context
    prompt = tokens(1, 10)
    n_new = 3 * context
    out = model.generate(prompt, n_new, temperature=0)
    assert out.shape == (1, 10 + n_new)
    seq, start = prompt, 0
    with torch.no_grad():
        for _ in range(n_new):
            if seq.size(1) - start > context:
                start = seq.size(1) - context // 2
            nxt = model(seq[:, start:])[0][:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_generate_crops_long_prompt(model):
    out = model.generate(tokens(1, 40), 3, temperature=0)
    assert out.shape == (1, 43)


def test_sampling_options(model):
    prompt = tokens(1, 3)
    a = model.generate(prompt, 8, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    greedy = model.generate(prompt, 8, temperature=0)
    assert torch.equal(model.generate(prompt, 8, top_k=1), greedy)
    assert torch.equal(model.generate(prompt, 8, top_p=1e-6), greedy)
    nucleus = model.generate(prompt, 8, top_p=0.9, top_k=20, temperature=0.8,
                             generator=torch.Generator().manual_seed(1))
    assert nucleus.shape == (1, 11)
    with pytest.raises(ValueError):
        model.generate(prompt, 2, top_p=0.0)
    with pytest.raises(ValueError):
        model.generate(prompt, 2, temperature=-1)


def test_stream_and_mode_restored(model):
    seen: list[int] = []
    model.train()
    out = model.generate(tokens(1, 3), 5, temperature=0, stream=seen.append)
    assert seen == out[0, 3:].tolist()
    assert model.training
    with pytest.raises(ValueError, match="batch size 1"):
        model.generate(tokens(2, 3), 2, stream=seen.append)


def test_generate_under_bf16_autocast(model):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(tokens(1, 3), 20, temperature=0)
    assert out.shape == (1, 23)


# ---------------------------------------------------------------------- memory layers


class AddBias(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.full((dim,), 0.5))
        self.calls = 0

    def forward(self, x: torch.Tensor, memory=None) -> torch.Tensor:
        self.calls += 1
        return x + self.bias


def test_memory_layer_changes_output_and_removal_restores(model):
    idx = tokens(2, 8)
    with torch.no_grad():
        before = model(idx)[0]
        memory = AddBias(model.config.dim)
        model.set_memory_layer(0, memory)
        assert model.memory_layer(0) is memory
        assert model.blocks[0].memory is memory
        during = model(idx)[0]
        assert memory.calls == 1
        assert not torch.allclose(before, during)
        assert "blocks.0.memory.bias" in dict(model.named_parameters())
        model.set_memory_layer(0, None)
        after = model(idx)[0]
    torch.testing.assert_close(after, before)
    assert model.memory_layer(0) is None
    assert not any("memory" in name for name, _ in model.named_parameters())
    assert not any("memory" in key for key in model.state_dict())


def test_memory_layer_trains_and_is_used_in_generation(model):
    memory = AddBias(model.config.dim)
    model.set_memory_layer(1, memory)
    _, loss = model(tokens(2, 8), tokens(2, 8, seed=3))
    loss.backward()
    assert memory.bias.grad is not None
    model.generate(tokens(1, 2), 3, temperature=0)
    assert memory.calls >= 2


def test_memory_layer_validation(model):
    with pytest.raises(ValueError, match="memory layer"):
        model.set_memory_layer(2, nn.Identity())
    with pytest.raises(TypeError):
        model.set_memory_layer(0, lambda x: x)  # type: ignore[arg-type]
    assert model.blocks[0].memory is None
    assert "memory" not in dict(model.blocks[0].named_children())


# ------------------------------------------------------------------------- reference


@pytest.mark.parametrize(
    "shape",
    [
        dict(vocab_size=61, dim=32, layers=2, heads=4, context=16),
        dict(vocab_size=259, dim=64, layers=3, heads=2, context=40),
        dict(vocab_size=100, dim=48, layers=1, heads=3, context=8, mlp_ratio=2.5),
    ],
)
def test_reference_parameters_equal_core(shape):
    cfg = ModelConfig(**shape)
    core, ref = Transformer(cfg), ReferenceGPT(cfg)
    assert comparable_parameters(ref) == comparable_parameters(core) == core.num_parameters()
    assert comparable_parameters(ref) == sum(p.numel() for p in ref.parameters()) - cfg.context * cfg.dim


def test_reference_forward():
    torch.manual_seed(0)
    ref = ReferenceGPT(tiny())
    idx = tokens(2, 16)
    logits, loss = ref(idx, tokens(2, 16, seed=5))
    assert logits.shape == (2, 16, 61)
    assert abs(loss.item() - math.log(61)) < 0.15
    assert ref.lm_head.weight is ref.wte.weight
    with pytest.raises(ValueError, match="context"):
        ref(tokens(1, 17))


def test_rope_leaves_a_hooked_qkv_projection_unrotated(model):
    """RoPE rotates the qkv output in place only when nothing else can hold it: a forward
    hook on the projection keeps seeing the plain projection."""
    seen = []
    block = model.blocks[0]
    handle = block.attn.qkv.register_forward_hook(lambda m, i, out: seen.append((i[0], out)))
    try:
        with torch.no_grad():
            hooked = model(tokens(2, 8))[0]
    finally:
        handle.remove()
    inputs, out = seen[0]
    torch.testing.assert_close(out, inputs @ block.attn.qkv.weight.T)
    with torch.no_grad():  # and the in-place path computes the same logits
        torch.testing.assert_close(model(tokens(2, 8))[0], hooked)
