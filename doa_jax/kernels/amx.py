"""bf16 matmuls on Intel AMX for the CPU backend: an XLA FFI custom call, built on first use.

XLA's CPU backend runs bf16 dots through generic loops that reach about 0.25 TFLOP/s on a
Sapphire Rapids core pair, while the same chip's AMX tiles do several times that. This module
compiles `amx_matmul.cc` (C++ with the AMX intrinsics, against the XLA FFI headers that jaxlib
ships) with the machine's C++ compiler, caches the shared library under
`$DOA_JAX_CACHE` (default `~/.cache/doa_jax`), and registers it as the `doa_amx_matmul` target.

`matmul(x, w)` is differentiable (the backward pass is two more AMX products), and
`pack(w)` lays a weight out once in the tile order the kernel reads, so that a decode loop
does not repack its weights at every step.

Whether the kernels run is decided at trace time by `use_amx(mode, dtype)`: `'auto'` takes them
for bf16 compute on a single CPU device whose processor has AMX and where the library builds;
`'amx'` insists (and raises, naming the reason, where it cannot); `'xla'` never uses them. The
kernels are single-device: on a multi-device mesh `'auto'` keeps XLA's dot, which the SPMD
partitioner can split.
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

MODES = ('auto', 'amx', 'xla')
_SOURCE = Path(__file__).with_name('amx_matmul.cc')
_TARGET = 'doa_amx_matmul'
_PACK_TARGET = 'doa_amx_pack'
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
            raise RuntimeError(f'building the AMX kernel failed ({" ".join(cmd)}):\n'
                               f'{proc.stderr[-2000:]}')
        os.replace(tmp_out, out)
    return out


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(library, '') once the targets are registered, or (None, why not)."""
    if platform.system() != 'Linux' or platform.machine() != 'x86_64':
        return None, f'AMX kernels need Linux on x86-64, not {platform.system()} {platform.machine()}'
    missing = {'amx_tile', 'amx_bf16', 'avx512_bf16', 'avx512bw'} - _cpu_flags()
    if missing:
        return None, f'this CPU lacks {", ".join(sorted(missing))}'
    cxx = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')
    if not cxx:
        return None, 'no C++ compiler (g++ or $CXX) to build the AMX kernel'
    try:
        lib = ctypes.CDLL(str(_build(cxx)))
    except (RuntimeError, OSError) as e:
        return None, str(e)
    if not lib.DoaAmxAvailable():
        return None, 'the kernel refused this process the AMX tile state (arch_prctl)'
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.DoaAmxMatmul), platform='cpu')
    jax.ffi.register_ffi_target(_PACK_TARGET, jax.ffi.pycapsule(lib.DoaAmxPack), platform='cpu')
    return lib, ''


def available() -> tuple[bool, str]:
    """(True, '') when the AMX kernels can run in this process, else (False, the reason)."""
    lib, why = _load()
    return lib is not None, why


def use_amx(mode: str, dtype) -> bool:
    """Trace-time choice between the AMX kernels and XLA's dot for a matmul in `dtype`."""
    if mode not in MODES:
        raise ValueError(f'Unknown cpu_matmul {mode!r}; choose one of {MODES}.')
    if mode == 'xla':
        return False
    reasons = []
    if jnp.dtype(dtype) != jnp.bfloat16:
        reasons.append(f'the compute dtype is {jnp.dtype(dtype).name}, not bfloat16')
    if jax.default_backend() != 'cpu':
        reasons.append(f'the backend is {jax.default_backend()}, not cpu')
    if jax.device_count() != 1:
        reasons.append(f'there are {jax.device_count()} devices (the kernels are single-device)')
    if not reasons:
        ok, why = available()
        if ok:
            return True
        reasons.append(why)
    if mode == 'amx':
        raise ValueError('cpu_matmul="amx" cannot run here: ' + '; '.join(reasons)
                         + '. Use cpu_matmul="auto" to fall back to XLA\'s dot.')
    return False


def _round_up(x: int, m: int = _ROW_MULTIPLE) -> int:
    return -(-x // m) * m


def _call(a: Array, b: Array, out_shape: tuple[int, int], *, trans_a: bool = False,
          trans_b: bool = False, b_packed: bool = False, out_dtype=jnp.bfloat16) -> Array:
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(out_shape, out_dtype),
                            vmap_method='sequential')
    return call(a, b, trans_a=np.int64(trans_a), trans_b=np.int64(trans_b),
                b_packed=np.int64(b_packed))


@jax.custom_vjp
def _matmul2d(x: Array, w: Array) -> Array:
    return _call(x, w, (x.shape[0], w.shape[1]))


def _matmul2d_fwd(x, w):
    return _matmul2d(x, w), (x, w)


def _matmul2d_bwd(res, g):
    x, w = res
    g = g.astype(jnp.bfloat16)
    dx = _call(g, w, x.shape, trans_b=True)        # g [M, N] . w^T [N, K]
    dw = _call(x, g, w.shape, trans_a=True)        # x^T [K, M] . g [M, N]
    return dx, dw


_matmul2d.defvjp(_matmul2d_fwd, _matmul2d_bwd)


def matmul(x: Array, w: Array) -> Array:
    """x[..., K] . w[K, N] in bf16 with float32 accumulation; differentiable."""
    lead = x.shape[:-1]
    x2 = x.astype(jnp.bfloat16).reshape(-1, x.shape[-1])
    y = _matmul2d(x2, w.astype(jnp.bfloat16))
    return y.reshape(*lead, w.shape[1])


def pack(w: Array, *, transpose: bool = False) -> Array:
    """w[K, N] (or w[N, K] with `transpose`, giving the tiles of w^T) in the kernel's tile order,
    a flat bf16 array of Kp * Np values (K and N padded to multiples of 32). Pack a weight once
    and use `matmul_packed` where it multiplies many batches (a decode loop)."""
    k, n = (w.shape[1], w.shape[0]) if transpose else w.shape
    call = jax.ffi.ffi_call(_PACK_TARGET, jax.ShapeDtypeStruct(
            (_round_up(k) * _round_up(n),), jnp.bfloat16))
    return call(w.astype(jnp.bfloat16), trans=np.int64(transpose))


def matmul_packed(x: Array, packed: Array, features: int) -> Array:
    """x[..., K] . w where `packed = pack(w)` and w has `features` columns. Not differentiable
    (decode only)."""
    lead = x.shape[:-1]
    x2 = x.astype(jnp.bfloat16).reshape(-1, x.shape[-1])
    y = _call(x2, packed, (x2.shape[0], features), b_packed=True)
    return y.reshape(*lead, features)
