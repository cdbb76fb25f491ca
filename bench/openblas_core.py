"""The OpenBLAS kernels the PyTorch baselines run on, checked before torch is imported.

Debian's torch does its f32 matmuls in OpenBLAS (libopenblas0-pthread), which picks its kernels from the CPU's
model number when it loads. OpenBLAS 0.3.21 (Debian 12) does not know newer models: on an Intel Xeon of model
207 (Emerald Rapids, AVX-512 and AMX) it falls back to "Prescott", its SSE3 kernels, and a 2048^3 sgemm on 2
threads runs at ~30 GFLOP/s instead of ~195 with its SkylakeX kernels (measured 2026-12-06): a baseline 6x too
slow, which would make every ratio against PyTorch meaningless.

pin() reads the core OpenBLAS would choose (in a child process: the choice is made once, at load) and, only
when that core is not one of its AVX2 ones on a CPU that has AVX2, sets OPENBLAS_CORETYPE to the best family the CPU
supports (SkylakeX with AVX-512, else Haswell) for this process and the torch it imports. A core OpenBLAS
knows (Haswell, Zen, SkylakeX, SapphireRapids...) is left alone, and so is an OPENBLAS_CORETYPE already set.
"""

import os
import subprocess
import sys

# OpenBLAS 0.3.21's x86-64 cores with AVX2 kernels; any other it picks on an AVX2 CPU is a fallback.
AVX2_CORES = {"haswell", "zen", "skylakex", "cooperlake", "sapphirerapids"}
_AVX512_FLAGS = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
_HERE = os.path.dirname(os.path.abspath(__file__))
# The child loads nothing but this module and OpenBLAS: loaded_core(), printed.
_PROBE = f"import sys; sys.path.insert(0, {_HERE!r}); import openblas_core; print(openblas_core.loaded_core() or '')"

_note = "not checked"
_pinned = False


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def detected_core():
    """The core OpenBLAS picks by itself here, or None when libopenblas cannot be loaded."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    try:
        r = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0 or not r.stdout.strip():
        return None
    return r.stdout.strip()


def better_core(detected, flags):
    """The OPENBLAS_CORETYPE to force instead of `detected` on a CPU with `flags`, or None to keep it."""
    if detected is None or detected.lower() in AVX2_CORES or not {"avx2", "fma"} <= flags:
        return None
    return "SkylakeX" if _AVX512_FLAGS <= flags else "Haswell"


def pin():
    """Forces OpenBLAS's kernels where it would fall back below the CPU (see above); returns describe()."""
    global _note, _pinned
    if _pinned:  # a second call (a baseline importing another) would take our own setting for the caller's
        return _note
    _pinned = True
    if os.environ.get("OPENBLAS_CORETYPE"):
        _note = f"OpenBLAS core {os.environ['OPENBLAS_CORETYPE']} (OPENBLAS_CORETYPE set by the caller)"
        return _note
    detected = detected_core()
    forced = better_core(detected, cpu_flags())
    if forced:
        os.environ["OPENBLAS_CORETYPE"] = forced
        _note = (f"OpenBLAS core {forced} (forced: OpenBLAS detected {detected}, kernels without AVX2, on a CPU "
                 f"with {'AVX-512' if forced == 'SkylakeX' else 'AVX2'})")
    else:
        _note = f"OpenBLAS core {detected or 'unknown (libopenblas.so.0 not loadable)'}"
    return _note


def loaded_core():
    """The core of the OpenBLAS this process has loaded (loads it when nothing has), or None."""
    try:
        import ctypes
        lib = ctypes.CDLL("libopenblas.so.0")
        lib.openblas_get_corename.restype = ctypes.c_char_p
        return lib.openblas_get_corename().decode()
    except (OSError, AttributeError):
        return None


def describe():
    """What pin() found and did, and the core this process runs on, for the baseline's report."""
    return f"{_note}; this process runs OpenBLAS core {loaded_core() or 'unknown'}"


if __name__ == "__main__":
    print(pin())
