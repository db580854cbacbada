"""lmforge's CPU kernels, compiled for this machine on first use and cached: the quantized linears
(csrc/quant_cpu.cpp), and the engine's one-query attention, few-row float32 linear and GELU (csrc/decode_cpu.cpp).

    ops = cpu_kernels()          # torch.ops.lmforge_cpu, or None where they cannot be built (no C++ compiler)
    y = ops.int8_linear(x, w, scales, bias)

They are built with the machine's own instruction set (-march=native: vector paths for AVX-512 (VNNI for the
quantized dot products) and for AVX2, plain loops elsewhere) into
~/.cache/lmforge/kernels (or $LMFORGE_CACHE), keyed by the source, the PyTorch version and the CPU, so a cache shared
between machines never hands one another's code. Where they cannot be built (or with LMFORGE_NO_KERNELS=1 set),
quantize.py computes the same thing with PyTorch operators, and says so once.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path

import torch

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("quant_cpu.cpp", "decode_cpu.cpp")]
_state: dict = {}
_lock = threading.Lock()  # one build at a time in a process (the build folder has its own lock across processes)


# the lines of /proc/cpuinfo that name the CPU and its instruction set: x86's, and ARM's (which has no model name)
_CPU_FIELDS = ("model name", "flags", "CPU implementer", "CPU part", "Features")


def _cpu_id(info: str | None = None) -> str:
    """What the build cache key knows of this CPU: the architecture and the first line of each of _CPU_FIELDS in
    /proc/cpuinfo (info: its text, read when not given)."""
    machine = platform.machine()
    if info is None:
        try:
            info = Path("/proc/cpuinfo").read_text()
        except OSError:
            return platform.processor() or machine
    seen = {}  # the first line of each field (there is one per core)
    for line in info.splitlines():
        name = line.split(":")[0].strip()
        if name in _CPU_FIELDS and name not in seen:
            seen[name] = line
    return "\n".join([machine, *seen.values()])


# -fopenmp: at::parallel_for splits work across torch's threads only in code compiled with OpenMP (without it, the
# kernels ran on one core: 16 GB/s here against 26 on two); the loader reuses the libgomp torch already loaded, so
# torch.set_num_threads() sets their threads too
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]


def _build():
    from torch.utils.cpp_extension import load
    key = hashlib.sha256(b"".join(f.read_bytes() for f in SOURCES) + torch.__version__.encode() + _cpu_id().encode()
                         + " ".join(FLAGS).encode()).hexdigest()[:16]
    root = Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge")) / "kernels" / key
    root.mkdir(parents=True, exist_ok=True)
    path = os.environ.get("PATH")
    if sys.executable:  # the ninja that pip installed beside this Python, found even when the venv is not active
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent)] + ([path] if path else []))
    try:
        load(name="lmforge_cpu", sources=[str(f) for f in SOURCES], build_directory=str(root), is_python_module=False,
             extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], verbose=False)
    finally:
        if path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = path
    return torch.ops.lmforge_cpu


def cpu_kernels():
    """torch.ops.lmforge_cpu once built and loaded; None (with one warning) where building fails."""
    if "ops" in _state:  # (the path taken inside compiled code: a dictionary lookup)
        return _state["ops"]
    with _lock:
        return _load()


def _load():
    if "ops" not in _state:
        if os.environ.get("LMFORGE_NO_KERNELS"):
            _state["ops"] = None
            return None
        try:
            _state["ops"] = _build()
        except Exception as e:  # no compiler, no ninja, a failed build: every one means the PyTorch path
            warnings.warn(f"lmforge's CPU kernels could not be built ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}); quantized layers "
                          f"and decoding compute the same thing with PyTorch operators, more slowly",
                          RuntimeWarning, stacklevel=4)
            _state["ops"] = None
        else:
            _register_fakes()
    return _state["ops"]


def _register_fakes():
    """Shapes for torch.compile: the kernels are opaque calls inside a compiled graph."""
    @torch.library.register_fake("lmforge_cpu::int8_linear")
    def _(x, w, scales, bias):
        return x.new_empty(x.size(0), w.size(0))

    @torch.library.register_fake("lmforge_cpu::int4_linear")
    def _(x, w, scales, mins, bias, group):
        return x.new_empty(x.size(0), w.size(0))

    @torch.library.register_fake("lmforge_cpu::decode_attention")
    def _(q, k, v, mask, scale):
        return q.new_empty(q.shape)

    @torch.library.register_fake("lmforge_cpu::few_row_linear")
    def _(x, w, bias):
        return x.new_empty(*x.shape[:-1], w.size(0))

    @torch.library.register_fake("lmforge_cpu::gelu_tanh")
    def _(x):
        return torch.empty_like(x)

    @torch.library.register_fake("lmforge_cpu::pack_linear_weight")
    def _(w):  # (K, output columns padded to whole panels of two vectors: 16 floats without vectors)
        lanes = torch.ops.lmforge_cpu.vector_lanes()
        panel = 2 * lanes if lanes > 1 else 16
        return w.new_empty(w.size(1), -(-w.size(0) // panel) * panel)

    @torch.library.register_fake("lmforge_cpu::packed_linear")
    def _(x, packed, bias, n):
        return x.new_empty(*x.shape[:-1], n)

    @torch.library.register_fake("lmforge_cpu::int4_linear_rows8")
    def _(x, w8, scales8, mins8, bias, group, n):
        return x.new_empty(x.size(0), n)

    @torch.library.register_fake("lmforge_cpu::int8_linear_tiled")
    def _(x, w, scales, bias):
        return x.new_empty(*x.shape[:-1], w.size(0))

    @torch.library.register_fake("lmforge_cpu::int4_linear_tiled")
    def _(x, w, scales, mins, bias, group):
        return x.new_empty(*x.shape[:-1], w.size(0))
