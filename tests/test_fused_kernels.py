"""The fused float32 CPU kernels of bce and nce (``logitsep.losses._fused``): built and loaded here, equal to float64
references over the ranges the losses must hold, IEEE special values kept, the same results on any number of
threads, and the losses equal to their eager path; a failed build falls back with a warning and leaves no file."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil

import pytest
import torch
import torch.nn.functional as F

from logitsep.losses import _fused, binary_cross_entropy, nce

SUPPORTED = (platform.system() == "Linux" and platform.machine().lower() in ("x86_64", "amd64")
             and bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))
             and os.environ.get("LOGITSEP_FUSED_KERNELS", "1") != "0")
needs_kernel = pytest.mark.skipif(not SUPPORTED, reason="the fused kernels need Linux x86-64 and a C compiler "
                                  "(and are not switched off by LOGITSEP_FUSED_KERNELS=0)")


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """A process state without a loaded kernel and a private, empty kernel cache."""
    monkeypatch.setattr(_fused, "_STATE", {})
    monkeypatch.setenv("LOGITSEP_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture
def eager(monkeypatch):
    """Run the losses on torch's eager ops (as where the kernel cannot be built)."""
    monkeypatch.setattr(_fused, "_STATE", {"lib": None})


@needs_kernel
def test_kernel_builds_once_into_the_cache_and_loads(fresh_state) -> None:
    lib = _fused.library()
    assert lib is not None
    files = sorted((fresh_state / "kernels").iterdir())
    built = [f for f in files if f.suffix == ".so"]
    assert [f.suffix for f in files] == [".sha256", ".so"]  # the library, its recorded hash; no temporary file
    assert built[0].with_suffix(".sha256").read_text().strip() == hashlib.sha256(built[0].read_bytes()).hexdigest()
    stamp = built[0].stat().st_mtime_ns
    assert _fused._build(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")) == built[0]
    assert built[0].stat().st_mtime_ns == stamp  # found, not rebuilt


def test_a_failed_build_warns_falls_back_and_leaves_nothing(fresh_state, monkeypatch) -> None:
    monkeypatch.delenv("LOGITSEP_FUSED_KERNELS", raising=False)
    monkeypatch.setenv("CC", "/bin/false")
    monkeypatch.setattr(_fused.platform, "system", lambda: "Linux")
    monkeypatch.setattr(_fused.platform, "machine", lambda: "x86_64")
    with pytest.warns(RuntimeWarning, match="fused bce/nce kernel is unavailable"):
        assert _fused.library() is None
    assert not any((fresh_state / "kernels").iterdir())
    z = torch.randn(4, 6)
    assert not _fused.applies(z)
    assert torch.isfinite(binary_cross_entropy(z, torch.tensor([0, 1, 2, 3])))  # eager path


def test_the_kernel_can_be_switched_off(fresh_state, monkeypatch) -> None:
    monkeypatch.setenv("LOGITSEP_FUSED_KERNELS", "0")
    assert _fused.library() is None and not any(fresh_state.iterdir())


@needs_kernel
@pytest.mark.parametrize("k", [2, 3, 17, 256, 257, 1000, 10_000])
def test_softplus_row_sums_equal_float64(gen: torch.Generator, k: int) -> None:
    m = 12
    scales = torch.logspace(-4, 3, m, dtype=torch.float64)[:, None]  # 1e-4 .. 1e3, both signs
    z = (torch.randn(m, k, generator=gen, dtype=torch.float64) * scales).float()
    skip = torch.randint(0, k, (m,), generator=gen)
    for shift in (0.0, -3.5, 4.25):
        terms = F.softplus((z - shift).double())  # z − shift rounded to float32, as the eager path does
        torch.testing.assert_close(_fused.softplus_row_sums(z, shift).double(), terms.sum(dim=1),
                                   rtol=1e-6, atol=0)
        terms[torch.arange(m), skip] = 0.0
        torch.testing.assert_close(_fused.softplus_row_sums(z, shift, skip).double(), terms.sum(dim=1),
                                   rtol=1e-6, atol=0)


@needs_kernel
def test_every_softplus_term_keeps_its_relative_accuracy() -> None:
    """One entry per row, from −87 to 87: each row's sum is one term, from 1.6e-38 to 87."""
    v = torch.linspace(-87, 87, 20001)
    z = torch.stack([v, torch.full_like(v, -200.0)], dim=1)  # the second column adds exp(−200) = 0 in float32
    got = _fused.softplus_row_sums(z).double()
    want = F.softplus(v.double())
    assert ((got - want).abs() / want).max() < 5e-7


@needs_kernel
def test_scaled_sigmoid_equals_float64(gen: torch.Generator) -> None:
    z = torch.cat([torch.linspace(-87, 87, 4000), torch.randn(4000, generator=gen) * 1e-3]).view(16, 500)
    scale = torch.linspace(-2.0, 3.0, 16)
    for shift in (0.0, 2.5):
        want = torch.sigmoid((z - shift).double()) * scale.double()[:, None]  # z − shift in float32, as in eager
        # relative accuracy down to float32's smallest normal number (1.2e-38, about σ(−87.3)); below it, where
        # exp overflows or results are subnormal, an absolute error within that number times |scale|
        torch.testing.assert_close(_fused.scaled_sigmoid(z, scale, shift).double(), want, rtol=1e-6, atol=4e-38)


@needs_kernel
def test_special_values_keep_their_meaning() -> None:
    inf, nan = float("inf"), float("nan")
    z = torch.tensor([[0.0, 1.0, nan], [inf, 0.0, 0.0], [-inf, 0.0, 0.0]])
    sums = _fused.softplus_row_sums(z)
    assert torch.isnan(sums[0]) and sums[1] == inf
    assert sums[2].item() == pytest.approx(2 * torch.log(torch.tensor(2.0)).item(), rel=1e-6)
    grad = _fused.scaled_sigmoid(z, torch.ones(3))
    assert torch.isnan(grad[0, 2]) and grad[1, 0] == 1.0 and grad[2, 0] == 0.0


@needs_kernel
@pytest.mark.parametrize("threads", [2, 3])
def test_threads_split_the_rows_with_the_same_results(gen: torch.Generator, threads: int) -> None:
    z = torch.randn(301, 700, generator=gen) * 5
    skip = torch.randint(0, 700, (301,), generator=gen)
    scale = torch.rand(301, generator=gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _fused.softplus_row_sums(z, 0.5, skip), _fused.scaled_sigmoid(z, scale, 0.5)
        torch.set_num_threads(threads)
        many = _fused.softplus_row_sums(z, 0.5, skip), _fused.scaled_sigmoid(z, scale, 0.5)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def _value_and_grad(fn, z: torch.Tensor, target: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.clone().requires_grad_(True)
    value = fn(z, target, **kwargs)
    weights = torch.linspace(0.5, 2.0, value.numel()).view_as(value)
    (value * weights).sum().backward()
    return value.detach(), z.grad


CASES = [(binary_cross_entropy, {}), (nce, {}), (nce, {"num_noise": 3})]


@needs_kernel
@pytest.mark.parametrize(("fn", "kwargs"), CASES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_losses_equal_their_eager_path(gen: torch.Generator, monkeypatch, fn, kwargs, reduction: str) -> None:
    z = torch.randn(64, 300, generator=gen) * 6
    y = torch.randint(0, 300, (64,), generator=gen)
    multi = F.one_hot(y, 300).bool()
    multi[::3, 7] = True
    assert _fused.applies(z)
    fused = [_value_and_grad(fn, z, t, reduction=reduction, **kwargs) for t in (y, multi)]
    monkeypatch.setattr(_fused, "_STATE", {"lib": None})
    assert not _fused.applies(z)
    eager = [_value_and_grad(fn, z, t, reduction=reduction, **kwargs) for t in (y, multi)]
    for (value, grad), (value_e, grad_e) in zip(fused, eager, strict=True):
        torch.testing.assert_close(value, value_e, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, grad_e, rtol=1e-6, atol=1e-9)


def test_other_tensors_take_the_eager_path(eager) -> None:
    """float64, non-contiguous and (without a kernel) float32 inputs all give the same loss as the reference."""
    z = torch.randn(8, 10, dtype=torch.float64)
    y = torch.arange(8)
    want = (F.softplus(z).sum(dim=1) - z[torch.arange(8), y]).mean()
    torch.testing.assert_close(binary_cross_entropy(z, y), want)
    torch.testing.assert_close(binary_cross_entropy(z.T.contiguous().T, y), want)
    torch.testing.assert_close(binary_cross_entropy(z.float(), y).double(), want, rtol=1e-6, atol=1e-6)


@needs_kernel
def test_a_forked_child_computes_with_its_own_threads(gen: torch.Generator) -> None:
    """The parent's row-splitting threads do not exist in a fork (a DataLoader worker); the child must not wait on
    them."""
    import multiprocessing

    z = torch.randn(300, 700, generator=gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        expected = _fused.softplus_row_sums(z)  # the parent's pool now exists
        with multiprocessing.get_context("fork").Pool(1) as pool:
            got = pool.apply_async(_fused.softplus_row_sums, (z,)).get(timeout=60)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, expected)


@needs_kernel
def test_an_unwritable_cache_falls_back_to_the_temp_directory(monkeypatch, tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(_fused, "_STATE", {})
    monkeypatch.setenv("LOGITSEP_CACHE", str(blocker))  # cache_dir() would be blocker/kernels: cannot exist
    monkeypatch.setattr(_fused.tempfile, "gettempdir", lambda: str(tmp_path))
    assert _fused.library() is not None
    assert len(list(tmp_path.glob("logitsep-kernels-*/softplus-*.so"))) == 1


# ------------------------------------------------------------------ the kernel cache is never a way in (issue 20 #1)


def _compiler() -> str:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@needs_kernel
def test_a_planted_library_in_a_foreign_temp_folder_is_refused(monkeypatch, tmp_path) -> None:
    """The fallback folder in the temporary directory exists already, made by someone else (here: writable by
    all), with a library under the expected name: nothing is loaded from it."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(_fused, "_STATE", {})
    monkeypatch.setenv("LOGITSEP_CACHE", str(blocker))
    monkeypatch.setattr(_fused.tempfile, "gettempdir", lambda: str(tmp_path))
    planted = tmp_path / f"logitsep-kernels-{os.getuid()}"
    planted.mkdir()
    os.chmod(planted, 0o777)
    loaded = []
    monkeypatch.setattr(_fused.ctypes, "CDLL", lambda path: loaded.append(path))
    with pytest.warns(RuntimeWarning, match="writable by other users"):
        assert _fused.library() is None
    assert loaded == []


@needs_kernel
def test_a_folder_of_another_user_is_refused(fresh_state, monkeypatch) -> None:
    (fresh_state / "kernels").mkdir(mode=0o700)
    real = os.getuid()
    monkeypatch.setattr(_fused.os, "getuid", lambda: real + 1)
    with pytest.raises(_fused.UnsafeCache, match="belongs to user"):
        _fused._build(_compiler())


@needs_kernel
def test_a_symlinked_folder_or_library_is_refused(fresh_state, tmp_path_factory) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    os.chmod(elsewhere, 0o700)
    (fresh_state / "kernels").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(_fused.UnsafeCache, match="symlink"):
        _fused._build(_compiler())
    (fresh_state / "kernels").unlink()
    target = _fused._build(_compiler())
    target.unlink()
    (elsewhere / "evil.so").write_bytes(b"planted")
    target.symlink_to(elsewhere / "evil.so")
    with pytest.raises(_fused.UnsafeCache, match="symlink"):
        _fused._build(_compiler())


@needs_kernel
def test_a_library_that_fails_its_recorded_hash_is_rebuilt_not_loaded(fresh_state) -> None:
    target = _fused._build(_compiler())
    good = target.read_bytes()
    target.write_bytes(b"planted library")  # same owner, same folder: replaced content
    assert not _fused._trusted(target)
    assert _fused._build(_compiler()) == target and target.read_bytes() == good
    target.with_suffix(".sha256").unlink()  # no record: rebuilt as well
    assert _fused._build(_compiler()) == target and target.with_suffix(".sha256").is_file()
