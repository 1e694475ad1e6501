"""Fused float32 CPU kernels for ``bce`` and exact ``nce``: the row sums of softplus and their backward.

Both losses spend their time in ``Σ_j softplus(z_ij − c)``. Eager torch computes it in three passes over
``[m, k]`` (``F.softplus`` with the exp and log1p of its vector math library, a write, a row sum): about 300 µs at
``[256, 1000]`` on one core, more than ``F.cross_entropy`` forward and backward together (about 220 µs), whose
softmax kernel has a cheaper exp and one log per row. :file:`_softplus_kernel.c` does it in one pass, with glibc's
vector ``expf`` and a branch-free series for ``log1p`` on ``[0, 1]`` (127 µs); its backward ``s_i·σ(z_ij − c)``
is one pass as well.

The C file is compiled on first use with the system's C compiler (``$CC``, else ``cc``), for this CPU
(``-march=native``), into ``$LOGITSEP_CACHE`` (default ``~/.cache/logitsep``)``/kernels`` (this user's folder in
the temporary directory where that cannot be created), under a name that hashes the source, the flags, the
compiler and the CPU's model and flags, and written to a temporary file renamed into place, its SHA-256 recorded
beside it; then loaded with :mod:`ctypes` and checked once against torch on a sample. A library is loaded only
from a folder this user owns and no one else can write, only if it is a plain file of this user's (``lstat``: no
symlinks) whose SHA-256 is the recorded one: anything else is refused (a planted library would run as this user).
Everything else (another
platform, no compiler, a failed build or check, ``LOGITSEP_FUSED_KERNELS=0``, float64, a GPU) uses the eager path,
which gives the same values to float32 rounding. Rows are split over ``torch.get_num_threads()`` threads (ctypes
releases the GIL).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

_SOURCE = Path(__file__).with_name("_softplus_kernel.c")
_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd", "-fPIC", "-shared")
_LIBS = ("-lmvec", "-lm")
_PARALLEL_MIN = 1 << 16  # entries below which one thread does the whole tensor
_STATE: dict[str, object] = {}
_LOCK = threading.Lock()
_POOLS: dict[int, ThreadPoolExecutor] = {}
_P, _I64, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
# a forked child (a DataLoader worker) has none of the parent's pool threads: it makes its own pools
os.register_at_fork(after_in_child=_POOLS.clear)


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$LOGITSEP_CACHE/kernels``, default ``~/.cache/logitsep/kernels``."""
    return Path(os.environ.get("LOGITSEP_CACHE") or "~/.cache/logitsep").expanduser() / "kernels"


def _cpu_signature() -> bytes:
    """The CPU's model and feature flags: a kernel built with ``-march=native`` runs only where they match."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            lines = [line for line in f if line.startswith((b"model name", b"flags"))]
        return b"".join(sorted(set(lines)))
    except OSError:
        return platform.processor().encode()


class UnsafeCache(OSError):
    """A kernel folder or file that another user could have written: it is never loaded."""


def _check_private(path: Path, kind: str) -> None:
    """``path`` (``lstat``: a symlink is refused, not followed) is a ``kind`` ("dir" or "file") owned by this user
    and writable by no one else; :class:`UnsafeCache` otherwise."""
    st = os.lstat(path)
    is_kind = stat.S_ISDIR(st.st_mode) if kind == "dir" else stat.S_ISREG(st.st_mode)
    if not is_kind:
        raise UnsafeCache(f"{path} is not a plain {'folder' if kind == 'dir' else 'file'} (a symlink?)")
    if st.st_uid != os.getuid():
        raise UnsafeCache(f"{path} belongs to user {st.st_uid}, not to this user ({os.getuid()})")
    if st.st_mode & 0o022:
        raise UnsafeCache(f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o})")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _trusted(target: Path) -> bool:
    """Whether a built ``target`` may be loaded: a private plain file whose SHA-256 is the one recorded beside it
    when it was built (``.sha256``, private as well). A file that fails the hash is rebuilt over."""
    record = target.with_suffix(".sha256")
    if not os.path.lexists(target) or not os.path.lexists(record):
        return False
    _check_private(target, "file")
    _check_private(record, "file")
    return record.read_text().strip() == _digest(target)


def _folder() -> Path:
    """The kernel folder, made private if new: ``cache_dir()``, or this user's folder in the temporary directory
    where that cannot be created. An existing folder must be private (:func:`_check_private`): in a shared
    temporary directory another user could have made ``logitsep-kernels-<uid>`` first."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError:  # a read-only home (some CI runners, containers)
        folder = Path(tempfile.gettempdir()) / f"logitsep-kernels-{os.getuid()}"
        folder.mkdir(mode=0o700, exist_ok=True)
    _check_private(folder, "dir")
    return folder


def _build(compiler: str) -> Path:
    """Compile the kernel (or find it built and trusted) and return the shared library's path. Only files this
    user owns in a folder only this user can write, with the SHA-256 recorded at build time, are ever loaded
    (:class:`UnsafeCache` otherwise)."""
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS + _LIBS).encode(), compiler.encode(),
                                     _cpu_signature()])).hexdigest()[:20]
    folder = _folder()
    target = folder / f"softplus-{key}.so"
    if _trusted(target):
        return target
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".softplus-", suffix=".so")
    os.close(fd)
    record_tmp = None
    try:
        subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", tmp, *_LIBS], check=True, capture_output=True,
                       timeout=120)
        os.chmod(tmp, 0o700)
        digest = _digest(Path(tmp))
        record_fd, record_tmp = tempfile.mkstemp(dir=folder, prefix=".softplus-", suffix=".sha256")
        with os.fdopen(record_fd, "w") as f:
            f.write(digest + "\n")
        os.replace(record_tmp, target.with_suffix(".sha256"))
        os.replace(tmp, target)  # a concurrent build of the same key writes the same bytes: either wins
    finally:
        for leftover in (tmp, record_tmp):
            if leftover and os.path.exists(leftover):
                os.unlink(leftover)
    if not _trusted(target):  # another process replaced one of the two between our renames
        raise UnsafeCache(f"{target} does not match its recorded SHA-256 after the build")
    return target


def _self_check(lib: ctypes.CDLL) -> bool:
    """The kernels against torch's eager float64 on entries from 1e-4 to 1e3 in size, both signs."""
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(8, 300, generator=gen, dtype=torch.float64)
         * torch.logspace(-4, 3, 8, dtype=torch.float64)[:, None]).float()
    skip = torch.arange(8) * 37
    scale = torch.linspace(0.5, 2.0, 8)
    out, grad = torch.empty(8), torch.empty_like(z)
    lib.softplus_row_sums(z.data_ptr(), 8, 300, 0.25, skip.data_ptr(), out.data_ptr())
    lib.scaled_sigmoid(z.data_ptr(), 8, 300, 0.25, scale.data_ptr(), grad.data_ptr())
    zd = (z - 0.25).double()  # shifted in float32, as the kernel does
    terms = F.softplus(zd)
    terms[torch.arange(8), skip] = 0.0
    want_grad = torch.sigmoid(zd) * scale.double()[:, None]
    return (bool(torch.allclose(out.double(), terms.sum(dim=1), rtol=1e-5, atol=0))
            and bool(torch.allclose(grad.double(), want_grad, rtol=1e-5, atol=1e-30)))


def _load() -> ctypes.CDLL | None:
    if os.environ.get("LOGITSEP_FUSED_KERNELS", "1") == "0":
        return None
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None  # libmvec, the vector math library the kernel calls, is glibc's for x86-64
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
        lib.softplus_row_sums.argtypes = [_P, _I64, _I64, _F32, _P, _P]
        lib.softplus_row_sums.restype = None
        lib.scaled_sigmoid.argtypes = [_P, _I64, _I64, _F32, _P, _P]
        lib.scaled_sigmoid.restype = None
        if not _self_check(lib):
            raise RuntimeError("its results differ from torch's on the check sample")
        return lib
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        warnings.warn(f"logitsep: the fused bce/nce kernel is unavailable ({error}"
                      f"{': ' + detail.decode(errors='replace').strip()[:300] if detail else ''}); "
                      "using torch's eager ops (slower, same values)", RuntimeWarning, stacklevel=3)
        return None


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they cannot be used (built and checked once per process)."""
    if "lib" not in _STATE:
        with _LOCK:
            if "lib" not in _STATE:
                _STATE["lib"] = _load()
    return _STATE["lib"]  # type: ignore[return-value]


def applies(z: Tensor) -> bool:
    """Whether the fused kernels handle ``z``: a contiguous float32 ``[m, k]`` CPU tensor, kernels available."""
    return (z.dtype == torch.float32 and z.device.type == "cpu" and z.dim() == 2 and z.is_contiguous()
            and library() is not None)


def _over_rows(call, m: int, k: int) -> None:
    """``call(begin, end)`` over row ranges: one range, or one per torch thread when the tensor is large."""
    threads = min(torch.get_num_threads(), m)
    if threads < 2 or m * k < _PARALLEL_MIN:
        call(0, m)
        return
    with _LOCK:
        pool = _POOLS.get(threads) or _POOLS.setdefault(threads, ThreadPoolExecutor(threads, "logitsep-kernel"))
    bounds = [m * i // threads for i in range(threads + 1)]
    for future in [pool.submit(call, a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]:
        future.result()


def softplus_row_sums(z: Tensor, shift: float = 0.0, skip: Tensor | None = None) -> Tensor:
    """``out_i = Σ_{j ≠ skip_i} softplus(z_ij − shift)`` (all ``j`` when ``skip`` is None), float32 ``[m]``.
    ``z``: see :func:`applies`; ``skip``: int64 ``[m]`` column indices in ``[0, k)``."""
    lib = library()
    m, k = z.shape
    out = torch.empty(m, dtype=torch.float32)
    if skip is not None:
        skip = skip.to(torch.int64).contiguous()
    zp, op = z.data_ptr(), out.data_ptr()
    sp = None if skip is None else skip.data_ptr()

    def call(a: int, b: int) -> None:
        lib.softplus_row_sums(zp + 4 * a * k, b - a, k, shift, None if sp is None else sp + 8 * a, op + 4 * a)

    _over_rows(call, m, k)
    return out


def scaled_sigmoid(z: Tensor, scale: Tensor, shift: float = 0.0) -> Tensor:
    """``grad_ij = scale_i·σ(z_ij − shift)``, float32 ``[m, k]``; ``scale``: ``[m]``."""
    lib = library()
    m, k = z.shape
    scale = scale.to(torch.float32).contiguous()
    grad = torch.empty_like(z)
    zp, sp, gp = z.data_ptr(), scale.data_ptr(), grad.data_ptr()

    def call(a: int, b: int) -> None:
        lib.scaled_sigmoid(zp + 4 * a * k, b - a, k, shift, sp + 4 * a, gp + 4 * a * k)

    _over_rows(call, m, k)
    return grad
