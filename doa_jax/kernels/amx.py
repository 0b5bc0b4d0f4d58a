"""bf16 matmuls for the CPU backend on AMX tiles or AVX512-BF16: an XLA FFI custom call, built on
first use.

XLA's CPU backend runs bf16 dots through generic loops (about 0.25 TFLOP/s on a Sapphire Rapids
core pair, 0.05-0.44 on a Zen 5 core pair), while the same chips' bf16 units do several times that.
This module compiles `amx_matmul.cc` (C++ with the AMX and AVX512-BF16 intrinsics, against the XLA
FFI headers that jaxlib ships) with the machine's C++ compiler, caches the shared library under
`$DOA_JAX_CACHE` (default `~/.cache/doa_jax`), and registers it as the `doa_amx_matmul` target.
One library carries two instruction paths over one operand layout: AMX tiles (Intel Sapphire
Rapids and later) and AVX512-BF16 dot products (`VDPBF16PS`: AMD Zen 4/5, Intel Cooper Lake).

`matmul(x, w)` is differentiable (the backward pass is two more kernel products), and
`pack(w)` lays a weight out once in the tile order the kernel reads, so that a decode loop
does not repack its weights at every step. The same library holds attention kernels
(`attention` over whole sequences, differentiable, and `decode_attention` for one decode step) and
float32 decode products (`pack_f32`, `matmul_f32_packed`).

Where the kernels serve the model is decided in `doa_jax.ops` (`matmul_impl` /
`attention_impl` = 'cpu_kernels', or 'auto' on a single CPU device where `available()` holds); the
instruction path is `best_isa()`: AMX where the processor has it, else AVX512-BF16.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Instruction paths, best first, and the `isa` attribute the kernel takes for each.
ISAS = ('amx', 'avx512_bf16')
_ISA_CODE = {'amx': 1, 'avx512_bf16': 2}
_SOURCE = Path(__file__).with_name('amx_matmul.cc')
_TARGET = 'doa_amx_matmul'
_PACK_TARGET = 'doa_amx_pack'
_ATTENTION_TARGET = 'doa_decode_attention'
_F32_TARGET = 'doa_f32_matmul'
_F32_PACK_TARGET = 'doa_f32_pack'
_ATTENTION_FWD_TARGET = 'doa_attention_fwd'
_ATTENTION_BWD_TARGET = 'doa_attention_bwd'
_FLAGS = ('-O3', '-std=c++17', '-shared', '-fPIC', '-w', '-mavx512f', '-mavx512bw',
          '-mavx512vl', '-mavx512bf16', '-mamx-tile', '-mamx-bf16')
# Operand dims are padded to these multiples inside the kernel (and in `pack`).
_ROW_MULTIPLE = 32


def _cpu_flags() -> set[str]:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('flags'):
                    return set(line.split(':', 1)[1].split())
    except OSError:
        pass
    return set()


def cache_dir() -> Path:
    return Path(os.environ.get('DOA_JAX_CACHE', Path.home() / '.cache' / 'doa_jax')) / 'kernels'


def _build(cxx: str) -> Path:
    """Compiles the kernel into the cache (atomically: parallel processes may race here)."""
    import jaxlib
    include = jax.ffi.include_dir()
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + ' '.join(_FLAGS).encode() + jaxlib.__version__.encode()
                         + cxx.encode()).hexdigest()[:16]
    out = cache_dir() / f'amx_matmul_{key}.so'
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        cmd = [cxx, *_FLAGS, f'-I{include}', str(_SOURCE), '-o', str(tmp_out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f'building the CPU kernels failed ({" ".join(cmd)}):\n'
                               f'{proc.stderr[-2000:]}')
        os.replace(tmp_out, out)
    return out


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(library, '') once the targets are registered, or (None, why not)."""
    if platform.system() != 'Linux' or platform.machine() != 'x86_64':
        return None, f'the CPU kernels need Linux on x86-64, not {platform.system()} {platform.machine()}'
    missing = {'avx512f', 'avx512bw', 'avx512vl', 'avx512_bf16'} - _cpu_flags()
    if missing:
        return None, f'this CPU lacks {", ".join(sorted(missing))}'
    cxx = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')
    if not cxx:
        return None, 'no C++ compiler (g++ or $CXX) to build the CPU kernels'
    try:
        lib = ctypes.CDLL(str(_build(cxx)))
    except (RuntimeError, OSError) as e:
        return None, str(e)
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.DoaAmxMatmul), platform='cpu')
    jax.ffi.register_ffi_target(_PACK_TARGET, jax.ffi.pycapsule(lib.DoaAmxPack), platform='cpu')
    jax.ffi.register_ffi_target(_ATTENTION_TARGET, jax.ffi.pycapsule(lib.DoaDecodeAttention),
                                platform='cpu')
    jax.ffi.register_ffi_target(_F32_TARGET, jax.ffi.pycapsule(lib.DoaF32Matmul), platform='cpu')
    jax.ffi.register_ffi_target(_F32_PACK_TARGET, jax.ffi.pycapsule(lib.DoaF32Pack),
                                platform='cpu')
    jax.ffi.register_ffi_target(_ATTENTION_FWD_TARGET, jax.ffi.pycapsule(lib.DoaAttentionFwd),
                                platform='cpu')
    jax.ffi.register_ffi_target(_ATTENTION_BWD_TARGET, jax.ffi.pycapsule(lib.DoaAttentionBwd),
                                platform='cpu')
    return lib, ''


@functools.cache
def _isa_available(isa: str) -> tuple[bool, str]:
    lib, why = _load()
    if lib is None:
        return False, why
    if isa == 'amx':
        missing = {'amx_tile', 'amx_bf16'} - _cpu_flags()
        if missing:
            return False, f'this CPU lacks {", ".join(sorted(missing))}'
        if not lib.DoaAmxAvailable():
            return False, 'the kernel refused this process the AMX tile state (arch_prctl)'
    return True, ''


def available(isa: str | None = None) -> tuple[bool, str]:
    """(True, '') when the kernels can run in this process on `isa` ('amx' or 'avx512_bf16'; None:
    on either), else (False, the reason)."""
    if isa is None:
        reasons = []
        for candidate in ISAS:
            ok, why = _isa_available(candidate)
            if ok:
                return True, ''
            reasons.append(f'{candidate}: {why}')
        return False, '; '.join(reasons)
    if isa not in ISAS:
        raise ValueError(f'Unknown CPU kernel isa {isa!r}; choose one of {ISAS}.')
    return _isa_available(isa)


def best_isa() -> str | None:
    """The fastest instruction path the kernels have here, or None."""
    return next((isa for isa in ISAS if _isa_available(isa)[0]), None)


def _round_up(x: int, m: int = _ROW_MULTIPLE) -> int:
    return -(-x // m) * m


def _registered() -> None:
    """Builds and registers the kernels on first use; raises where they cannot run."""
    lib, why = _load()
    if lib is None:
        raise RuntimeError(f'doa_jax CPU kernels unavailable: {why}')


def _call(a: Array, b: Array, out_shape: tuple[int, int], *, trans_a: bool = False,
          trans_b: bool = False, b_packed: bool = False, out_dtype=jnp.bfloat16,
          isa: str = 'amx') -> Array:
    _registered()
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(out_shape, out_dtype),
                            vmap_method='sequential')
    return call(a, b, trans_a=np.int64(trans_a), trans_b=np.int64(trans_b),
                b_packed=np.int64(b_packed), isa=np.int64(_ISA_CODE[isa]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul2d(x: Array, w: Array, isa: str) -> Array:
    return _call(x, w, (x.shape[0], w.shape[1]), isa=isa)


def _matmul2d_fwd(x, w, isa):
    return _matmul2d(x, w, isa), (x, w)


def _matmul2d_bwd(isa, res, g):
    x, w = res
    g = g.astype(jnp.bfloat16)
    dx = _call(g, w, x.shape, trans_b=True, isa=isa)        # g [M, N] . w^T [N, K]
    # x^T [K, M] . g [M, N], written in w's dtype: a float32 weight gets its float32 sums.
    dw = _call(x, g, w.shape, trans_a=True, out_dtype=w.dtype, isa=isa)
    return dx, dw


_matmul2d.defvjp(_matmul2d_fwd, _matmul2d_bwd)


def matmul(x: Array, w: Array, isa: str = 'amx') -> Array:
    """x[..., K] . w[K, N] in bf16 with float32 accumulation on `isa`; differentiable. A float32 w
    (a parameter) is rounded to bf16 inside the kernel as it is laid out, and its gradient comes
    back in float32; no separate conversion pass reads the weight."""
    lead = x.shape[:-1]
    x2 = x.astype(jnp.bfloat16).reshape(-1, x.shape[-1])
    if w.dtype != jnp.float32:
        w = w.astype(jnp.bfloat16)
    y = _matmul2d(x2, w, isa)
    return y.reshape(*lead, w.shape[1])


def pack(w: Array, *, transpose: bool = False) -> Array:
    """w[K, N] (or w[N, K] with `transpose`, giving the tiles of w^T) in the kernel's tile order,
    a flat bf16 array of Kp * Np values (K and N padded to multiples of 32); both instruction paths
    read it. Pack a weight once and use `matmul_packed` where it multiplies many batches (a decode
    loop)."""
    k, n = (w.shape[1], w.shape[0]) if transpose else w.shape
    _registered()
    call = jax.ffi.ffi_call(_PACK_TARGET, jax.ShapeDtypeStruct(
            (_round_up(k) * _round_up(n),), jnp.bfloat16))
    return call(w.astype(jnp.bfloat16), trans=np.int64(transpose))


def matmul_packed(x: Array, packed: Array, features: int, isa: str = 'amx') -> Array:
    """x[..., K] . w where `packed = pack(w)` and w has `features` columns. Not differentiable
    (decode only)."""
    lead = x.shape[:-1]
    x2 = x.astype(jnp.bfloat16).reshape(-1, x.shape[-1])
    y = _call(x2, packed, (x2.shape[0], features), b_packed=True, isa=isa)
    return y.reshape(*lead, features)


def decode_attention(q: Array, k: Array, v: Array, bias: Array, *,
                     round_weights: bool | None = None) -> Array:
    """One decode step of attention in one kernel call: q [B, H, D], k and v [B, L, H, D] (bf16 or
    float32, the layout the projections write), bias [B, H, L] (relative positions and masks).
    Returns float32 [B, H, D]: softmax(q . k + bias) . v. `round_weights` (default: for a bf16
    cache) rounds the softmax weights to bf16 first, as the model's XLA path does in bf16. Not
    differentiable."""
    _registered()
    cache = jnp.bfloat16 if k.dtype == jnp.bfloat16 else jnp.float32
    if round_weights is None:
        round_weights = cache == jnp.bfloat16
    call = jax.ffi.ffi_call(_ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32),
                            vmap_method='sequential')
    return call(q.astype(jnp.float32), k.astype(cache), v.astype(cache),
                bias.astype(jnp.float32), round_weights=np.int64(round_weights))


def pack_f32(w: Array, *, transpose: bool = False) -> Array:
    """w[K, N] (or w[N, K] with `transpose`) as float32 32-column strips for `matmul_f32_packed`:
    a flat array of Np * K values (N padded to a multiple of 32)."""
    k, n = (w.shape[1], w.shape[0]) if transpose else w.shape
    _registered()
    call = jax.ffi.ffi_call(_F32_PACK_TARGET, jax.ShapeDtypeStruct((_round_up(n) * k,),
                                                                   jnp.float32))
    return call(w.astype(jnp.float32), trans=np.int64(transpose))


def matmul_f32_packed(x: Array, packed: Array, features: int) -> Array:
    """x[..., K] . w in float32, where `packed = pack_f32(w)` and w has `features` columns. Not
    differentiable (decode only)."""
    _registered()
    lead = x.shape[:-1]
    x2 = x.astype(jnp.float32).reshape(-1, x.shape[-1])
    call = jax.ffi.ffi_call(_F32_TARGET, jax.ShapeDtypeStruct((x2.shape[0], features),
                                                              jnp.float32))
    return call(x2, packed).reshape(*lead, features)


def _attention_call(target: str, outs, *args, round_weights: bool):
    _registered()
    return jax.ffi.ffi_call(target, outs, vmap_method='sequential')(
            *args, round_weights=np.int64(round_weights))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, bias, keep, round_weights):
    return _attention_forward(q, k, v, bias, keep, round_weights)[0]


def _attention_forward(q, k, v, bias, keep, round_weights):
    b, lq, h, _ = q.shape
    return _attention_call(
            _ATTENTION_FWD_TARGET, (jax.ShapeDtypeStruct(q.shape, q.dtype),
                                    jax.ShapeDtypeStruct((b, h, lq), jnp.float32)),
            q, k, v, bias, keep, round_weights=round_weights)


def _attention_fwd(q, k, v, bias, keep, round_weights):
    # Symbolic zeros tell whether the bias needs a gradient: a relative-position bias does, a
    # padding mask does not, and then the kernel writes no (B, H, Lq, Lk) bias gradient at all.
    args = [x.value for x in (q, k, v, bias, keep)]
    out, lse = _attention_forward(*args, round_weights)
    bias_grad = () if bias.perturbed else None
    return out, (*args, lse, bias_grad)


def _attention_bwd(round_weights, res, g):
    q, k, v, bias, keep, lse, bias_grad = res
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        g = jnp.zeros(q.shape, q.dtype)
    b, lq, h, _ = q.shape
    full = (b, h, lq, k.shape[1])
    like = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    d_bias_shape = full if bias_grad is not None else (1,)
    dq, dk, dv, d_bias = _attention_call(
            _ATTENTION_BWD_TARGET,
            (like(q), like(k), like(v), jax.ShapeDtypeStruct(d_bias_shape, jnp.float32)),
            q, k, v, bias, keep, lse, g.astype(q.dtype), round_weights=round_weights)
    if bias_grad is None:
        return dq, dk, dv, None, None
    broadcast = tuple(a for a in range(3) if bias.shape[a] == 1 and full[a] != 1)
    return dq, dk, dv, d_bias.sum(axis=broadcast, keepdims=True), None


_attention.defvjp(_attention_fwd, _attention_bwd, symbolic_zeros=True)


def attention(q: Array, k: Array, v: Array, bias: Array | None = None, *,
              keep: Array | None = None, round_weights: bool | None = None) -> Array:
    """softmax(q . k + bias) . v over whole sequences, per batch row and head, in one kernel call
    (and one for the backward pass); differentiable in q, k, v and bias.

    q [B, Lq, H, D], k and v [B, Lk, H, D] (the layout the projections write, so no head-major
    transposes), all bf16 or all float32; bias broadcastable to [B, H, Lq, Lk] (relative positions
    and masks), read in place along broadcast axes; where the bias needs no gradient (a mask), the
    backward pass computes none. Logits, softmax and products are float32; the result has q's
    dtype, [B, Lq, H, D].
    `round_weights` (default: for bf16 inputs) rounds the softmax weights to bf16 before they
    weight v, as the model's XLA path does in bf16. `keep` applies dropout to the weights: scales
    broadcastable to [B, H, Lq, Lk], 0 where a weight is dropped and 1 / keep probability elsewhere
    (`nn.Dropout` applied to ones draws them). Only the per-row log-normalizer is kept for the
    backward pass, which recomputes the weights."""
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] \
            or k.shape[2:] != q.shape[2:]:
        raise ValueError(f'attention: q [B, Lq, H, D] and k, v [B, Lk, H, D], got {q.shape}, '
                         f'{k.shape}, {v.shape}.')
    dtype = jnp.dtype(q.dtype)
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        raise ValueError(f'attention takes bf16 or float32 inputs, not {dtype.name}.')
    b, lq, h, _ = q.shape
    full = (b, h, lq, k.shape[1])
    # The kernel reads a bias broadcast over batch rows, heads or queries in place (strides of
    # 0); only the key axis is made full-sized.
    bias = jnp.zeros((1,), jnp.float32) if bias is None else bias.astype(jnp.float32)
    bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    if bias.ndim != 4 or any(d not in (1, f) for d, f in zip(bias.shape, full)):
        raise ValueError(f'attention: the bias {bias.shape} does not broadcast to {full}.')
    bias = jnp.broadcast_to(bias, bias.shape[:3] + full[3:])
    keep = jnp.ones((1,), jnp.float32) if keep is None else jnp.broadcast_to(
            keep.astype(jnp.float32), full)
    if round_weights is None:
        round_weights = dtype == jnp.bfloat16
    return _attention(q, k.astype(dtype), v.astype(dtype), bias, keep, bool(round_weights))
