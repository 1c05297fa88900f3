"""A one-pass CPU kernel for LAMB's moment and update step (optional, built on first use).

Why: on CPU a LAMB step is bound by memory traffic. Built from torch kernels it takes
about 14 passes over parameter-sized fp32 memory (copy w, torch's fused Adam kernel, two
norms, the update); this kernel reads w, g, m, v once and writes m, v, u once (7 passes)
while summing ||w||^2 and ||u||^2 on the way, so with the final ``w += -lr r u`` (3
passes) a step is 10 passes, the floor for any layer-wise method that stores u.

How: ~40 lines of C, compiled with the system C compiler (``cc``, ~0.2 s, no Python or
torch headers) into ``$TORCH_EXTENSIONS_DIR/lbllm`` (else ``~/.cache/lbllm``), loaded with
ctypes and called on raw pointers. GCC builds AVX-512, AVX2 and plain clones and picks one
at load time, so a shared cache is safe across machines. ctypes releases the GIL, so the
work is split over ``torch.get_num_threads()`` Python threads. Without a compiler (or with
``LBLLM_NATIVE_LAMB=0``) ``available()`` is False and LAMB uses torch's kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["available", "usable", "lamb_moments_update"]

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <math.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

/* LAMB moments and update over chunks [c0, c1). Chunk k is elements [lo[k], hi[k]) of
   tensor t = idx[k], whose fp32 data starts at w[t], g[t], m[t], v[t], u[t]:
       g' = g * inv_div
       m  = m + a1 (g' - m)                 v = b2 v + a2 g'^2        (a = 1 - b, exact in double)
       u  = (m inv_bc1) / (sqrt(v) inv_sqrt_bc2 + eps) + wd w
   and out[2k], out[2k+1] = sum w^2, sum u^2 over the chunk. */
CLONES void lamb_chunks(const int64_t* w, const int64_t* g, const int64_t* m, const int64_t* v,
                        const int64_t* u, const int64_t* idx, const int64_t* lo, const int64_t* hi,
                        int64_t c0, int64_t c1, float a1, float b2, float a2, float inv_div,
                        float inv_bc1, float inv_sqrt_bc2, float eps, float wd, double* out)
{
    for (int64_t k = c0; k < c1; ++k) {
        const int64_t t = idx[k];
        const float* restrict W = (const float*)w[t];
        const float* restrict G = (const float*)g[t];
        float* restrict M = (float*)m[t];
        float* restrict V = (float*)v[t];
        float* restrict U = (float*)u[t];
        double sw = 0.0, su = 0.0;
        for (int64_t s = lo[k]; s < hi[k]; s += 2048) {  /* float partial sums, double totals */
            const int64_t e = s + 2048 < hi[k] ? s + 2048 : hi[k];
            float aw = 0.0f, au = 0.0f;
            #pragma omp simd reduction(+:aw, au)
            for (int64_t i = s; i < e; ++i) {
                const float gi = G[i] * inv_div;
                const float mi = M[i] + a1 * (gi - M[i]);
                const float vi = b2 * V[i] + a2 * gi * gi;
                const float wi = W[i];
                const float ui = (mi * inv_bc1) / (sqrtf(vi) * inv_sqrt_bc2 + eps) + wd * wi;
                M[i] = mi; V[i] = vi; U[i] = ui;
                aw += wi * wi; au += ui * ui;
            }
            sw += aw; su += au;
        }
        out[2 * k] = sw;
        out[2 * k + 1] = su;
    }
}
"""

_CHUNK = 1 << 16  # elements per chunk: the unit of work split among threads
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, pool)


def _cache_dir() -> Path:
    base = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(base) / "lbllm" if base else Path.home() / ".cache" / "lbllm"


def _build() -> ctypes.CDLL | None:
    if os.environ.get("LBLLM_NATIVE_LAMB", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.info("lbllm: no C compiler found; LAMB uses torch's kernels on CPU")
        return None
    flags = ["-O3", "-shared", "-fPIC", "-fno-math-errno", "-fopenmp-simd"]
    tag = hashlib.sha1((_SOURCE + " ".join(flags) + cc).encode()).hexdigest()[:16]
    out = _cache_dir() / f"lamb_cpu_{tag}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            src = Path(tmp) / "lamb_cpu.c"
            src.write_text(_SOURCE)
            lib = Path(tmp) / out.name
            proc = subprocess.run([cc, *flags, str(src), "-o", str(lib)], capture_output=True, text=True)
            if proc.returncode != 0:
                log.warning("lbllm: building the CPU LAMB kernel failed, using torch's kernels:\n%s",
                            proc.stderr[-2000:])
                return None
            os.replace(lib, out)  # atomic: concurrent ranks may build the same file
    lib = ctypes.CDLL(str(out))
    fn = lib.lamb_chunks
    fn.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 2 + [ctypes.c_float] * 8 + [ctypes.c_void_p]
    fn.restype = None
    return lib


def available() -> bool:
    """Whether the kernel is built (building it on the first call)."""
    global _lib, _tried
    with _lock:
        if not _tried:
            _tried = True
            try:
                _lib = _build()
            except OSError as exc:
                log.warning("lbllm: CPU LAMB kernel unavailable (%s), using torch's kernels", exc)
                _lib = None
    return _lib is not None


def usable(*lists: list[Tensor]) -> bool:
    """The kernel takes contiguous fp32 CPU tensors only."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
               for ts in lists for t in ts)


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool
    pid = os.getpid()  # a forked child must not reuse the parent's (dead) threads
    if _pool is None or _pool[0] != pid or _pool[1] != workers:
        _pool = (pid, workers, ThreadPoolExecutor(workers, thread_name_prefix="lbllm-lamb"))
    return _pool[2]


_PLANS: dict[tuple[int, ...], tuple[Tensor, Tensor, Tensor]] = {}


def _plan(numels: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """Chunks (tensor index, lo, hi) covering every tensor, cached per list of sizes."""
    plan = _PLANS.get(numels)
    if plan is None:
        idx, lo, hi = [], [], []
        for t, n in enumerate(numels):
            for s in range(0, n, _CHUNK):
                idx.append(t)
                lo.append(s)
                hi.append(min(s + _CHUNK, n))
        if len(_PLANS) > 32:
            _PLANS.clear()
        plan = _PLANS[numels] = tuple(torch.tensor(x, dtype=torch.int64) for x in (idx, lo, hi))
    return plan


def lamb_moments_update(weights: list[Tensor], grads: list[Tensor], exp_avg: list[Tensor],
                        exp_avg_sq: list[Tensor], update: list[Tensor], *, beta1: float, beta2: float,
                        bias_correction1: float, bias_correction2: float, eps: float, weight_decay: float,
                        grad_divisor: float = 1.0) -> tuple[Tensor, Tensor]:
    """Update the moments in place, write u into ``update``; return (||w||^2, ||u||^2) per tensor.

    Same math as lbllm's LAMB (Algorithm 2): ``u = m_hat / (sqrt(v_hat) + eps) + wd * w``
    with the gradient divided by ``grad_divisor`` (global-norm clipping) first; ``p.grad``
    is only read. All tensors: contiguous fp32 on CPU (see ``usable``). The norms are
    float64 tensors of length ``len(weights)``.
    """
    assert _lib is not None, "call available() first"
    idx, lo, hi = _plan(tuple(w.numel() for w in weights))
    ptrs = [torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64)
            for ts in (weights, grads, exp_avg, exp_avg_sq, update)]
    n_chunks = idx.numel()
    out = torch.empty(n_chunks, 2, dtype=torch.float64)
    args = [p.data_ptr() for p in ptrs] + [idx.data_ptr(), lo.data_ptr(), hi.data_ptr()]
    # 1 - beta in double, then rounded once: 1 - float(0.999) would be off by 1e-5 relative.
    scalars = [1.0 - beta1, beta2, 1.0 - beta2, 1.0 / grad_divisor, 1.0 / bias_correction1,
               1.0 / bias_correction2 ** 0.5, eps, weight_decay]

    def run(c0: int, c1: int) -> None:
        _lib.lamb_chunks(*args, c0, c1, *scalars, out.data_ptr())

    workers = max(1, min(torch.get_num_threads(), n_chunks))
    if workers == 1:
        run(0, n_chunks)
    else:
        bounds = [n_chunks * i // workers for i in range(workers + 1)]
        # ctypes drops the GIL for the call, so the chunks really run in parallel.
        list(_executor(workers).map(run, bounds[:-1], bounds[1:]))
    sums = torch.zeros(len(weights), 2, dtype=torch.float64).index_add_(0, idx, out)
    return sums[:, 0], sums[:, 1]
