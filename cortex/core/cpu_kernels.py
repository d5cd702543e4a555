"""The transformer core's speed paths: hand-written autograd functions for CPU training.

[`cortex.core.transformer`][cortex.core.transformer] is written in plain PyTorch. Three of its
steps have a faster version here, each computing what the plain step computes (checked by the
tests, switch on against switch off):

* [`rms_norm`][cortex.core.cpu_kernels.rms_norm]: RMSNorm with a backward built on LayerNorm's
  fused kernel (``native_layer_norm_backward``), its output written in the autocast dtype.
* [`rotary_qkv`][cortex.core.cpu_kernels.rotary_qkv]: the fused qkv projection split into q, k
  and v with RoPE on q and k, in one pass each way, rotated in place where nothing else reads
  the projection (it looks at the global forward hooks to know).
* [`causal_attention`][cortex.core.cpu_kernels.causal_attention]: RoPE plus causal attention
  for bf16 training on CPU, with the flash-attention backward run in float32
  (``_scaled_dot_product_flash_attention_for_cpu`` and its backward).

Where nothing is differentiated (generation, ``torch.no_grad``) RMSNorm and the rotation run
their forward computation directly: entering an autograd function costs more than either
does on one token.

**The switch.** Every entry point returns ``None`` where its fast path does not apply (another
device or dtype, a mask, a cache, dropout...) and the caller then runs its plain PyTorch code.
Setting ``cortex.core.cpu_kernels.enabled = False`` makes every entry point return ``None``:
the model then runs on plain PyTorch alone, with the same values (within rounding) and slower.

These kernels lean on private or unstable PyTorch internals, which is why they live apart.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["as_complex", "causal_attention", "enabled", "rms_norm", "rotary_qkv"]

#: the one switch: ``False`` sends the transformer down its plain PyTorch paths
enabled = True


def as_complex(x: torch.Tensor) -> torch.Tensor:
    """View float32 ``x`` (..., d) as complex (..., d/2), copying only if the strides forbid it."""
    x = x.unflatten(-1, (-1, 2))
    if x.stride(-1) != 1 or x.storage_offset() % 2 or any(s % 2 for s in x.stride()[:-1]):
        x = x.contiguous()
    return torch.view_as_complex(x)


# ----------------------------------------------------------------------------- RMSNorm


_layer_norm_backward = torch.ops.aten.native_layer_norm_backward.default


def _rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float,
                      out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of ``x`` in ``out_dtype`` and the reciprocal root mean square it divided by."""
    # Tensor.norm is the fastest single-pass sum of squares on CPU here
    rstd = x.norm(dim=-1, keepdim=True).square_().div_(x.size(-1)).add_(eps).rsqrt_()
    # one fresh buffer, scaled in place (fresh allocations cost page faults on CPU); the
    # cast is a separate pass because mixed-dtype ``out=`` is twice as slow on CPU
    return torch.mul(x, rstd).mul_(weight).to(out_dtype), rstd


class _RMSNormFunction(torch.autograd.Function):
    """``y = x * rsqrt(mean(x^2) + eps) * weight`` with a backward built on LayerNorm's.

    PyTorch's CPU RMSNorm differentiates through a chain of elementwise ops (about four
    times the cost of LayerNorm). With a zero mean, LayerNorm's fused backward computes
    ``rstd * (gw - mean(gw) - xhat * mean(gw * xhat))`` and the weight gradient
    ``sum(g * xhat)``; adding back ``rstd * mean(gw)`` gives RMSNorm's exact gradient.

    The output is returned in ``out_dtype`` (the autocast dtype under autocast), so the
    next linear layer does not cast it again.
    """

    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        y, rstd = _rms_norm_forward(x, weight, eps, out_dtype)
        ctx.save_for_backward(x, rstd, weight)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        dim = x.size(-1)
        grad = grad.to(x.dtype).contiguous()
        grad_x, grad_weight, _ = _layer_norm_backward(
            grad, x, [dim], torch.zeros_like(rstd), rstd, weight, None,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False],
        )
        if grad_x is not None:
            correction = torch.mv(grad.view(-1, dim), weight).view(rstd.shape).mul_(rstd)
            grad_x.add_(correction, alpha=1.0 / dim)  # (addcmul_ with broadcasting is slower)
        return grad_x, grad_weight, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """``F.rms_norm(x, (dim,), weight, eps)`` for contiguous CPU inputs whose dtype equals the
    weight's (e.g. the float32 residual stream under bf16 autocast, where the output is bf16);
    first derivatives only. ``None`` where it does not apply."""
    if not (enabled and x.device.type == "cpu" and x.dtype == weight.dtype and x.is_contiguous()):
        return None
    out_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return _rms_norm_forward(x, weight, eps, out_dtype)[0]  # nothing to differentiate (generation)
    return _RMSNormFunction.apply(x, weight, eps, out_dtype)


# ------------------------------------------------------------------- RoPE and q, k, v


def _split_rotated(qkv: torch.Tensor, rotate: torch.Tensor, heads: int, in_place: bool):
    """q, k, v (B, heads, T, head_dim) of ``qkv`` with q and k rotated by ``rotate``."""
    C = qkv.size(-1) // 3
    hd = C // heads
    qk = qkv[..., : 2 * C].unflatten(-1, (2 * heads, hd))
    if in_place:  # view_as_complex raises rather than copy, so the rotation lands in qkv
        torch.view_as_complex(qk.unflatten(-1, (-1, 2))).mul_(rotate)
        rotated = qk
    else:
        rotated = torch.view_as_real(as_complex(qk.float()) * rotate).flatten(-2).to(qkv.dtype)
    q = rotated[:, :, :heads].transpose(1, 2)
    k = rotated[:, :, heads:].transpose(1, 2)
    v = qkv[..., 2 * C :].unflatten(-1, (heads, hd)).transpose(1, 2)
    return q, k, v


class _RotaryQKV(torch.autograd.Function):
    """Split a fused projection (B, T, 3*dim) into q, k, v (B, heads, T, head_dim) with RoPE
    on q and k, in one pass forward and one pass backward.

    Written by hand because autograd's version of slicing q, k and v out of one tensor
    allocates and sums a zero-filled gradient per slice, which cost more than the rotation.
    Rotations are complex multiplications in float32. With ``in_place`` (float32 only) q
    and k are rotated inside ``qkv`` itself, which saves a buffer and a pass: the caller
    promises that nothing else reads ``qkv`` (see ``_owns``).
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, rotate: torch.Tensor, unrotate: torch.Tensor, heads: int,
                in_place: bool = False):
        ctx.save_for_backward(unrotate)
        return _split_rotated(qkv, rotate, heads, in_place)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_q, grad_k, grad_v):
        (inverse,) = ctx.saved_tensors
        ref = next(g for g in (grad_q, grad_k, grad_v) if g is not None)
        B, H, T, hd = ref.shape
        C = H * hd
        grad = torch.empty(B, T, 3 * C, dtype=ref.dtype, device=ref.device)
        for i, g in enumerate((grad_q, grad_k)):
            dst = grad[..., i * C : (i + 1) * C].unflatten(-1, (H, hd))
            if g is None:
                dst.zero_()
                continue
            src = as_complex(g.transpose(1, 2).float())
            if dst.dtype == torch.float32:
                torch.mul(src, inverse, out=torch.view_as_complex(dst.unflatten(-1, (-1, 2))))
            else:
                dst.copy_(torch.view_as_real(src * inverse).flatten(-2))
        dst = grad[..., 2 * C :].unflatten(-1, (H, hd))
        if grad_v is None:
            dst.zero_()
        else:
            dst.copy_(grad_v.transpose(1, 2))
        return grad, None, None, None, None


def _owns(projection: nn.Module) -> bool:
    """Whether the projection's output is read by nobody but the attention: no forward hook
    (a plasticity rule, a probe) may hold it when RoPE rotates it in place."""
    return not (projection._forward_hooks or nn.modules.module._global_forward_hooks)


def rotary_qkv(
    qkv: torch.Tensor, rope, heads: int, projection: nn.Module
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """q, k, v (B, heads, T, head_dim) of the output ``qkv`` (B, T, 3*dim) of ``projection``,
    with q and k rotated by ``rope`` (a [`RopeTables`][cortex.core.transformer.RopeTables]).
    Any device; in place in float32 when no forward hook can see ``qkv``. ``None`` when
    switched off."""
    if not enabled:
        return None
    in_place = qkv.dtype == torch.float32 and _owns(projection)
    if not (torch.is_grad_enabled() and qkv.requires_grad):
        return _split_rotated(qkv, rope.rotate, heads, in_place)  # nothing to differentiate (generation)
    return _RotaryQKV.apply(qkv, rope.rotate, rope.unrotate, heads, in_place)


# ------------------------------------------------------------- bf16 attention on CPU


_flash_forward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_flash_backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


class _RotaryAttentionBF16(torch.autograd.Function):
    """RoPE on q and k plus causal attention for bf16 training on CPU: (B, T, 3*dim) ->
    (B, heads, T, head_dim).

    The forward runs the very kernel ``F.scaled_dot_product_attention`` picks on CPU
    (flash attention, bf16). The backward runs that kernel's backward in float32, on the
    bf16 values the forward used: PyTorch's CPU flash-attention backward is markedly
    slower in bf16 than in float32 (it dominates a bf16 training step), and float32 is
    also the more accurate. The rotation of the gradients then needs no extra casts.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, rotate: torch.Tensor, unrotate: torch.Tensor, heads: int):
        C = qkv.size(-1) // 3
        hd = C // heads
        rotated = as_complex(qkv[..., : 2 * C].unflatten(-1, (2 * heads, hd)).float())  # a copy
        rotated = torch.view_as_real(rotated.mul_(rotate)).flatten(-2).to(qkv.dtype)
        q = rotated[:, :, :heads].transpose(1, 2)
        k = rotated[:, :, heads:].transpose(1, 2)
        v = qkv[..., 2 * C :].unflatten(-1, (heads, hd)).transpose(1, 2)
        out, logsumexp = _flash_forward(q, k, v, 0.0, True)
        ctx.save_for_backward(q, k, v, out, logsumexp, unrotate)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, logsumexp, inverse = ctx.saved_tensors
        B, H, T, hd = q.shape
        C = H * hd
        grads = _flash_backward(
            grad_out.float(), q.float(), k.float(), v.float(), out.float(), logsumexp, 0.0, True
        )
        grad = torch.empty(B, T, 3 * C, dtype=q.dtype, device=q.device)
        for i, g in enumerate(grads):
            dst = grad[..., i * C : (i + 1) * C].unflatten(-1, (H, hd))
            if i < 2:  # undo the rotation of q and k
                g = torch.view_as_real(as_complex(g.transpose(1, 2)).mul_(inverse)).flatten(-2)
                dst.copy_(g)
            else:
                dst.copy_(g.transpose(1, 2))
        return grad, None, None, None


def _use_bf16_cpu_attention(qkv: torch.Tensor) -> bool:
    return (
        qkv.dtype == torch.bfloat16
        and qkv.device.type == "cpu"
        and qkv.requires_grad
        and torch.is_grad_enabled()
        and _flash_backward is not None
    )


def causal_attention(qkv: torch.Tensor, rope, heads: int) -> torch.Tensor | None:
    """Causal self-attention (no mask, no cache, no dropout) of ``qkv`` (B, T, 3*dim) with RoPE
    on q and k, (B, heads, T, head_dim), for bf16 training on CPU. ``None`` otherwise."""
    if not (enabled and _use_bf16_cpu_attention(qkv)):
        return None
    return _RotaryAttentionBF16.apply(qkv, rope.rotate, rope.unrotate, heads)
