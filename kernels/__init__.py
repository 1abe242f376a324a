"""GLA kernels: the float64-capable reference, the chunked PyTorch form and the Triton fast paths.

Recurrence S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t * scale (scale = K ** -0.5 by default),
state V-first [.., H, V, K] float32. CPU tensors run PyTorch; CUDA tensors run Triton when it imports.
Importing this package never needs Triton or a GPU. Besides the recurrence, the fused layer ops that
cut a serving layer to ~9 kernels live here too: add_rms_norm, rms_norm_gate, swiglu and gla_prep
(kernels/triton_fused.py on CUDA, kernels/fused_torch.py elsewhere), and the small-batch GEMVs gemv and
swiglu_gemv (kernels/triton_gemv.py), which the model reaches through `linear` / `swiglu_linear` only
for single-row steps (GEMV_ROUTE: batch-1 decode; env GLA_TRITON_GEMV=0 turns it off). The sampler's
all-greedy batches use greedy_logprob (kernels/triton_sampling.py): argmax and its logprob in one pass.
"""

from __future__ import annotations

import importlib
import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from kernels._launch import env_flag
from kernels.chunk_torch import chunk_gla_prefill_torch, chunk_gla_torch
from kernels.decode_torch import fused_recurrent_gla_decode_torch, rms_norm_swish_gate
from kernels.fused_torch import (
    add_rms_norm_torch,
    gemv_torch,
    gla_prep_torch,
    norm_gemv_torch,
    rms_norm_gate_torch,
    swiglu_gemv_torch,
    swiglu_torch,
)
from kernels.naive import naive_recurrent_gla
from kernels.sampling_torch import greedy_logprob_torch

__all__ = [
    "add_rms_norm",
    "chunk_gla_prefill",
    "chunk_gla_torch",
    "DECODE_PROJ",
    "GEMV_ROUTE",
    "SHORT_PREFILL_MAX",
    "fused_recurrent_gla_decode",
    "gemv",
    "gla_decode_proj",
    "gla_prep",
    "greedy_logprob",
    "linear",
    "naive_recurrent_gla",
    "PreNorm",
    "normed",
    "use_prenorm",
    "norm_gemv",
    "rms_norm_gate",
    "rms_norm_swish_gate",
    "swiglu",
    "swiglu_gemv",
    "swiglu_linear",
]


class _Guarded:
    """Triton first, once per variant; if a variant's first call raises (a kernel that does not compile
    on this GPU/Triton), warn and serve that variant from the PyTorch path from then on. Compilation
    fails before any launch, so the state pool is untouched when we fall back."""

    def __init__(self, name: str, fast: Callable[..., Any], slow: Callable[..., Any],
                 errors: tuple[type[BaseException], ...]) -> None:
        self.name, self.fast, self.slow, self.errors = name, fast, slow, errors
        self.chosen: dict[tuple[bool, ...], Callable[..., Any]] = {}

    def __call__(self, variant: tuple[bool, ...], *args: Any) -> Any:
        fn = self.chosen.get(variant)
        if fn is not None:
            return fn(*args)
        try:
            out = self.fast(*args)
        except self.errors as exc:  # bad input (ValueError) propagates; a kernel that fails falls back
            warnings.warn(f"{self.name}{variant}: Triton path failed ({exc!r}); using PyTorch on CUDA",
                          RuntimeWarning, stacklevel=3)
            self.chosen[variant] = self.slow
            return self.slow(*args)
        self.chosen[variant] = self.fast
        return out


def _triton_errors() -> tuple[type[BaseException], ...]:
    """What a Triton path may raise when its kernel cannot build here (compile errors, OutOfResources,
    PTXAS failures): the guarded ops then fall back to PyTorch."""
    try:
        from triton.errors import TritonError

        return (TritonError, RuntimeError)
    except ImportError:
        return (RuntimeError,)


def _load_triton() -> tuple[_Guarded | None, _Guarded | None]:
    """The guarded Triton entry points, or (None, None) without CUDA or Triton (CUDA then uses PyTorch).

    Resolved once at import so the per-call dispatch costs an attribute test, not an import.
    """
    if not torch.cuda.is_available():
        return None, None
    try:
        from kernels.triton_chunk import chunk_gla_prefill_triton
        from kernels.triton_recurrent import fused_recurrent_gla_decode_triton
    except ImportError:
        return None, None
    errors = _triton_errors()
    return (_Guarded("chunk_gla_prefill", chunk_gla_prefill_triton, chunk_gla_prefill_torch, errors),
            _Guarded("fused_recurrent_gla_decode", fused_recurrent_gla_decode_triton,
                     fused_recurrent_gla_decode_torch, errors))


_TRITON_PREFILL, _TRITON_DECODE = _load_triton()
# The longest sequence (tokens) for which `model.prefill` picks `chunk_gla_prefill(short=True)` itself.
SHORT_PREFILL_MAX = 64


def gla_decode_proj_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor | None,
    lowrank: torch.Tensor,
    gk_weight: torch.Tensor,
    gk_bias: torch.Tensor | None,
    num_heads: int,
    head_k_dim: int,
    head_v_dim: int,
    normalizer: float,
    clamp_min: float | None,
    state_pool: torch.Tensor,
    state_slots: torch.Tensor,
    scale: float | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """`gla_decode_proj` as its two parts: `gla_prep` then the decode step (the spec of the fused kernel)."""
    q, k, v, gk, gate = gla_prep_torch(q, k, v, gate, lowrank, gk_weight, gk_bias, num_heads, head_k_dim,
                                       head_v_dim, normalizer, clamp_min)
    return fused_recurrent_gla_decode_torch(q, k, v, gk, state_pool, state_slots, scale, gate, norm_weight,
                                            norm_eps)


def _load_decode_proj() -> _Guarded | None:
    if _TRITON_DECODE is None:
        return None
    from kernels.triton_recurrent import gla_decode_proj_triton

    return _Guarded("gla_decode_proj", gla_decode_proj_triton, gla_decode_proj_torch, _triton_errors())


_TRITON_DECODE_PROJ = _load_decode_proj()


def _load_short() -> _Guarded | None:
    if _TRITON_DECODE is None:
        return None
    from kernels.triton_recurrent import short_prefill_triton

    return _Guarded("short_prefill", short_prefill_triton, chunk_gla_prefill_torch, _triton_errors())


_TRITON_SHORT = _load_short()


def chunk_gla_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_pool: torch.Tensor,
    state_slots: torch.Tensor,
    scale: float | None = None,
    initial_state_mask: torch.Tensor | None = None,
    checkpoint_positions: torch.Tensor | None = None,
    short: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Packed variable-length chunked prefill that reads and writes states in a pool.

    Args:
        q, k, g: [T, H, K] packed tokens of N sequences; g log-gates <= 0. v: [T, H, V].
        cu_seqlens: int32 [N+1], cu_seqlens[0] == 0, cu_seqlens[N] == T; every length >= 1.
        state_pool: float32 [S, H, V, K]; state_slots: int32 [N], distinct.
        scale: defaults to K ** -0.5.
        initial_state_mask: bool [N]; False starts sequence n from zeros. None means all True.
        checkpoint_positions: optional int64 [M] packed token indices p.
        short: run the recurrence token by token in one kernel on CUDA (same results; faster when
            every sequence has a few tokens, e.g. a resumed turn). Not with checkpoint_positions.

    A negative slot marks a padding sequence (CUDA-graph padding): it starts from zeros and its
    final state is discarded; no slot is read or written for it.

    Returns:
        o [T, H, V] in v.dtype; with checkpoint_positions, (o, states [M, H, V, K] float32) where
        states[m] is the state after consuming token p_m. Final states land in state_pool[state_slots].

    Example:
        >>> o = chunk_gla_prefill(q, k, v, g, cu, pool, slots)  # pool[slots] now holds final states
    """
    if short and checkpoint_positions is None and q.is_cuda and _TRITON_SHORT is not None:
        return _TRITON_SHORT((initial_state_mask is None,), q, k, v, g, cu_seqlens, state_pool, state_slots, scale,
                             initial_state_mask)
    if q.is_cuda and _TRITON_PREFILL is not None:
        return _TRITON_PREFILL((initial_state_mask is None, checkpoint_positions is None), q, k, v, g,
                               cu_seqlens, state_pool, state_slots, scale, initial_state_mask,
                               checkpoint_positions)
    return chunk_gla_prefill_torch(q, k, v, g, cu_seqlens, state_pool, state_slots, scale,
                                   initial_state_mask, checkpoint_positions)


def fused_recurrent_gla_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    state_pool: torch.Tensor,
    state_slots: torch.Tensor,
    scale: float | None = None,
    gate: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """One decode step for B sequences, state updated in place in the pool.

    Args:
        q, k, g: [B, H, K]; v: [B, H, V]; state_pool: float32 [S, H, V, K]; state_slots: int32 [B].
        scale: defaults to K ** -0.5.
        gate: optional [B, H, V]; then the output is RMSNorm_V(o) * norm_weight * swish(gate)
            (spec section 2 step 10), fused into the kernel on CUDA.
        norm_weight: [V] or None; norm_eps: RMSNorm epsilon.

    Returns:
        o [B, H, V] in v.dtype. Slots not in state_slots are untouched.

    Example:
        >>> o = fused_recurrent_gla_decode(q, k, v, g, pool, slots)
    """
    if q.is_cuda and _TRITON_DECODE is not None:
        return _TRITON_DECODE((gate is None, norm_weight is None), q, k, v, g, state_pool, state_slots,
                              scale, gate, norm_weight, norm_eps)
    return fused_recurrent_gla_decode_torch(q, k, v, g, state_pool, state_slots, scale,
                                            gate, norm_weight, norm_eps)


# Whether the model's decode step uses `gla_decode_proj` (prep fused into the decode kernel) where it
# applies; env GLA_FUSED_DECODE_PREP=0 turns it off (for A/B runs). Set before CUDA-graph capture.
DECODE_PROJ: dict[str, bool] = {
    "enabled": os.environ.get("GLA_FUSED_DECODE_PREP", "1").lower() not in ("0", "false", "no", "off"),
}


def gla_decode_proj(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor | None,
    lowrank: torch.Tensor,
    gk_weight: torch.Tensor,
    gk_bias: torch.Tensor | None,
    num_heads: int,
    head_k_dim: int,
    head_v_dim: int,
    normalizer: float,
    clamp_min: float | None,
    state_pool: torch.Tensor,
    state_slots: torch.Tensor,
    scale: float | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """`gla_prep` + `fused_recurrent_gla_decode` (gate given: RMSNorm x swish gate fused) in one kernel on
    CUDA, straight from the fused input projection's column slices [B, C].

    Why: at batch 1 a decode step is bound by kernel count, and the prep kernel was one of ten per
    layer (24 launches and their gaps per step for a 1.3B model).
    """
    args = (q, k, v, gate, lowrank, gk_weight, gk_bias, num_heads, head_k_dim, head_v_dim, normalizer, clamp_min,
            state_pool, state_slots, scale, norm_weight, norm_eps)
    if q.is_cuda and _TRITON_DECODE_PROJ is not None:
        return _TRITON_DECODE_PROJ((gate is None, gk_bias is None, clamp_min is None, norm_weight is None), *args)
    return gla_decode_proj_torch(*args)


# ---- fused layer ops (kernels/triton_fused.py; PyTorch forms in kernels/fused_torch.py) -----------

def _load_guarded(module: str, ops: dict[str, tuple[str, Callable[..., Any]]]) -> dict[str, _Guarded] | None:
    """Guarded Triton forms {name: (function in kernels.<module>, PyTorch fallback)}, or None
    without CUDA or Triton."""
    if not torch.cuda.is_available():
        return None
    try:
        mod = importlib.import_module(f"kernels.{module}")
    except ImportError:
        return None
    errors = _triton_errors()
    return {name: _Guarded(name, getattr(mod, fn), fallback, errors) for name, (fn, fallback) in ops.items()}


_TRITON_FUSED = _load_guarded("triton_fused", {
    "add_rms_norm": ("add_rms_norm_triton", add_rms_norm_torch),
    "rms_norm_gate": ("rms_norm_gate_triton", rms_norm_gate_torch),
    "swiglu": ("swiglu_triton", swiglu_torch),
    "gla_prep": ("gla_prep_triton", gla_prep_torch),
})
_TRITON_SAMPLING = _load_guarded("triton_sampling", {"greedy_logprob": ("greedy_logprob_triton", greedy_logprob_torch)})
_TRITON_GEMV = _load_guarded("triton_gemv", {
    "gemv": ("gemv_triton", gemv_torch),
    "swiglu_gemv": ("swiglu_gemv_triton", swiglu_gemv_torch),
    "norm_gemv": ("norm_gemv_triton", norm_gemv_torch),
})
GEMV_MAX_ROWS = 16  # kernels/triton_gemv.py MAX_ROWS; more rows go to the GEMM

# Whether the model's serving GEMMs (fused input projection, o_proj, gate|up, and SwiGLU + down_proj)
# run as Triton GEMVs when they have at most max_rows rows. On for 1 row (env GLA_TRITON_GEMV=0 turns
# it off, GLA_GEMV_MAX_ROWS widens it): on an H200 the batch-1 decode graph took 1.324 ms with the
# GEMVs, their norm prologue and PDL against 1.374 ms with cuBLAS; at 4-16 rows the GEMV's dot path
# lost to cuBLAS (down_proj 33 vs 13 us, benchmarks/results/gemv-h200.json). Set it before a CUDA
# graph is captured: graphs keep what they captured.
GEMV_ROUTE: dict[str, Any] = {
    "enabled": bool(env_flag("GLA_TRITON_GEMV", True)),
    "max_rows": min(GEMV_MAX_ROWS, int(os.environ.get("GLA_GEMV_MAX_ROWS", "1"))),
    # with the route on, the pre-norms (attn_norm, mlp_norm) run as the next GEMV's prologue (norm_gemv)
    "prenorm": bool(env_flag("GLA_GEMV_PRENORM", True)),
}


class PreNorm:
    """A residual add + RMSNorm not yet applied, handed to the projection that consumes the normed
    rows: `linear` runs it as `norm_gemv`'s prologue where the GEMV route applies (`use_prenorm`),
    else as the plain norm kernel first (`normed`). `new_residual()` is what the block carries on:
    x + residual in the residual's dtype, or x itself without a residual."""

    __slots__ = ("x", "residual", "weight", "eps", "round_sum", "normed", "sum")

    def __init__(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
                 round_sum: bool) -> None:
        self.x, self.residual, self.weight, self.eps, self.round_sum = x, residual, weight, eps, round_sum
        self.normed: torch.Tensor | None = None
        self.sum: torch.Tensor | None = x if residual is None else None

    def materialize(self) -> torch.Tensor:
        if self.normed is None:
            if self.residual is None:
                self.normed = rms_norm_gate(self.x, None, self.weight, self.eps)
            else:
                self.normed, self.sum = add_rms_norm(self.x, self.residual, self.weight, self.eps, self.round_sum)
        return self.normed

    def new_residual(self) -> torch.Tensor:
        """The residual after this norm; runs the norm if no consumer has."""
        if self.sum is None:
            self.materialize()
        assert self.sum is not None
        return self.sum


def normed(x: torch.Tensor | PreNorm) -> torch.Tensor:
    """The normed rows of a `PreNorm` (the norm kernel runs once), or x itself."""
    return x.materialize() if isinstance(x, PreNorm) else x


def use_prenorm(rows: int) -> bool:
    """Whether `linear` runs a `PreNorm` of `rows` rows as the prologue of its GEMV (`norm_gemv`)."""
    return bool(GEMV_ROUTE["enabled"] and GEMV_ROUTE["prenorm"] and rows <= GEMV_ROUTE["max_rows"])


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float, round_sum: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add + RMSNorm in one pass: (norm(x + residual) * weight in x.dtype, sum in residual.dtype).

    round_sum rounds the sum to residual.dtype before the norm (a plain residual add, then a norm);
    without it the norm reads the fp32 sum (fla's fused prenorm). See kernels/fused_torch.py.
    """
    if x.is_cuda and _TRITON_FUSED is not None:
        return _TRITON_FUSED["add_rms_norm"]((round_sum, weight is None), x, residual, weight, eps, round_sum)
    return add_rms_norm_torch(x, residual, weight, eps, round_sum)


def rms_norm_gate(
    x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """RMSNorm over the last dim [x weight] [x swish(gate)], fp32 math, stored in x.dtype."""
    if x.is_cuda and _TRITON_FUSED is not None:
        return _TRITON_FUSED["rms_norm_gate"]((gate is None, weight is None), x, gate, weight, eps)
    return rms_norm_gate_torch(x, gate, weight, eps)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] = gate | up (one fused GEMM) -> swish(gate) * up in fp32, stored in x.dtype."""
    if x.is_cuda and _TRITON_FUSED is not None:
        return _TRITON_FUSED["swiglu"]((), x)
    return swiglu_torch(x)


def gla_prep(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor | None,
    lowrank: torch.Tensor,
    gk_weight: torch.Tensor,
    gk_bias: torch.Tensor | None,
    num_heads: int,
    head_k_dim: int,
    head_v_dim: int,
    normalizer: float,
    clamp_min: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fused-projection slices [M, C] -> contiguous q, k, gk [M, H, K], v, gate [M, H, V] (kv heads
    repeated) with gk = clamp(logsigmoid(lowrank @ gk_weight^T + gk_bias) / normalizer). One kernel on CUDA.
    """
    args = (q, k, v, gate, lowrank, gk_weight, gk_bias, num_heads, head_k_dim, head_v_dim, normalizer, clamp_min)
    if q.is_cuda and _TRITON_FUSED is not None:
        return _TRITON_FUSED["gla_prep"]((gate is None, gk_bias is None, clamp_min is None), *args)
    return gla_prep_torch(*args)


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T (a Linear weight, no bias), fp32 accumulation, in x.dtype.

    One Triton kernel on CUDA for at most 16 rows (kernels/triton_gemv.py); `F.linear` otherwise.
    """
    rows = math.prod(x.shape[:-1])
    if x.is_cuda and _TRITON_GEMV is not None and 0 < rows <= GEMV_MAX_ROWS:
        return _TRITON_GEMV["gemv"]((rows == 1, x.dtype == torch.float32), x, weight)
    return gemv_torch(x, weight)


def swiglu_gemv(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """h [..., 2I] = gate | up -> (swish(gate) * up in h.dtype) @ weight [N, I]^T: SwiGLU fused into
    down_proj's GEMV on CUDA (at most 16 rows); `swiglu` then `F.linear` otherwise."""
    rows = math.prod(h.shape[:-1])
    if h.is_cuda and _TRITON_GEMV is not None and 0 < rows <= GEMV_MAX_ROWS:
        return _TRITON_GEMV["swiglu_gemv"]((rows == 1, h.dtype == torch.float32), h, weight)
    return swiglu_gemv_torch(h, weight)


def norm_gemv(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor | None, eps: float, round_sum: bool,
    weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(`add_rms_norm(x, residual, ...)`'s normed rows @ weight [N, K]^T, their sum in residual.dtype);
    without a residual, `rms_norm_gate(x, None, norm_weight, eps)` @ weight^T and None.

    On CUDA with at most 16 rows the norm is the GEMV's prologue (kernels/triton_gemv.py): each
    program recomputes the rows' RMS from x (+ residual), which are a few KB, and the programs of the
    first output block store the sum, so a decode step loses its two norm kernels per layer.
    """
    rows = math.prod(x.shape[:-1])
    if x.is_cuda and _TRITON_GEMV is not None and 0 < rows <= GEMV_MAX_ROWS:
        return _TRITON_GEMV["norm_gemv"]((rows == 1, x.dtype == torch.float32, residual is None, round_sum), x,
                                         residual, norm_weight, eps, round_sum, weight)
    return norm_gemv_torch(x, residual, norm_weight, eps, round_sum, weight)


def linear(x: torch.Tensor | PreNorm, weight: torch.Tensor) -> torch.Tensor:
    """The model's bias-free serving projections: `gemv` when GEMV_ROUTE is on and x has at most
    max_rows rows, else `F.linear`. Decided from shapes alone, so CUDA-graph capture sees no sync.
    A `PreNorm` not yet applied runs as `norm_gemv`'s prologue there (`use_prenorm`); its new
    residual is kept on it."""
    if isinstance(x, PreNorm):
        if x.normed is None and use_prenorm(math.prod(x.x.shape[:-1])):
            y, s = norm_gemv(x.x, x.residual, x.weight, x.eps, x.round_sum, weight)
            if s is not None:
                x.sum = s
            return y
        x = x.materialize()
    if GEMV_ROUTE["enabled"] and math.prod(x.shape[:-1]) <= GEMV_ROUTE["max_rows"]:
        return gemv(x, weight)
    return F.linear(x, weight)


def swiglu_linear(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`swiglu` then down_proj, or `swiglu_gemv` in one kernel when `linear` would use the GEMV."""
    if GEMV_ROUTE["enabled"] and math.prod(h.shape[:-1]) <= GEMV_ROUTE["max_rows"]:
        return swiglu_gemv(h, weight)
    return F.linear(swiglu(h), weight)


def greedy_logprob(logits: torch.Tensor) -> torch.Tensor:
    """[B, V] logits -> [B, 2] float64 rows (argmax id, its log-softmax); ties go to the lowest id.

    One kernel on CUDA (kernels/triton_sampling.py) for the sampler's all-greedy batches, whose
    PyTorch form was about eight kernels of GPU tail per decode step.
    """
    if logits.is_cuda and _TRITON_SAMPLING is not None:
        return _TRITON_SAMPLING["greedy_logprob"]((), logits)
    return greedy_logprob_torch(logits)
