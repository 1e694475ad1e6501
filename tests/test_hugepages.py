"""core.hugepages: large CPU tensors in transparent huge pages, ordinary tensors otherwise."""

from __future__ import annotations

import gc
import io

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from logitsep.core import hugepages
from logitsep.optim import RowSparseSGD

THP = hugepages._kernel_allows()
needs_thp = pytest.mark.skipif(not THP, reason="transparent huge pages not enabled (always/madvise) here")


@pytest.fixture(autouse=True)
def small_threshold(monkeypatch):
    monkeypatch.setattr(hugepages, "THRESHOLD", 8 << 20)  # 8 MiB: large enough for whole 2 MiB pages, quick
    monkeypatch.delenv("LOGITSEP_HUGE_PAGES", raising=False)


def _smaps(t: torch.Tensor) -> tuple[int, dict[str, int], set[str]]:
    """The start address, /proc/self/smaps fields (kB) and VmFlags of the mapping holding ``t``'s first byte."""
    address = t.data_ptr()
    first, fields, flags = -1, {}, set()
    with open("/proc/self/smaps", encoding="ascii") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(a, 16) for a in head.split("-"))
                if inside:
                    break
                inside = start <= address < end
                first = start if inside else first
            elif inside and head == "VmFlags:":
                flags = set(line.split()[1:])
            elif inside and line.split()[-1] == "kB":
                fields[head.rstrip(":")] = int(line.split()[1])
    return first, fields, flags


def _huge_kb(t: torch.Tensor) -> int:
    """How much of ``t``'s mapping is in huge pages (kB)."""
    return _smaps(t)[1].get("AnonHugePages", 0)


def _placed(t: torch.Tensor) -> bool:
    """Whether ``t`` is in a mapping of its own from :func:`hugepages.empty`: one that starts at its first byte and is
    marked ``MADV_HUGEPAGE`` (VmFlags ``hg``). Neither half alone tells: numpy marks its own large arrays, and freed,
    that memory goes back to the heap, marked, for torch to reuse (seen late in full test runs, here and on CI); and a
    kernel's policy may give unmarked memory huge pages. An allocator's block never starts at a mapping's first byte
    (its header is there)."""
    start, _, flags = _smaps(t)
    return start == t.data_ptr() and "hg" in flags


def _rss_kb() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@needs_thp
def test_a_large_tensor_is_backed_by_huge_pages():
    t = hugepages.zeros_like(torch.empty(4 << 20))  # 16 MiB of float32
    assert t.shape == (4 << 20,) and t.dtype == torch.float32 and not t.any()
    t.fill_(1.0)
    assert _placed(t) and _huge_kb(t) >= 8 << 10  # at least 8 MiB of it in 2 MiB pages
    assert not _placed(torch.ones(4 << 20))  # what torch's allocator gives


@pytest.mark.parametrize("why", ["small", "switched off", "kernel"])
def test_ordinary_tensors_where_huge_pages_do_not_apply(why, monkeypatch):
    big = torch.randn(4 << 20)
    if why == "small":
        small = torch.randn(1000)
        assert hugepages.moved(small) is small
        return
    if why == "switched off":
        monkeypatch.setenv("LOGITSEP_HUGE_PAGES", "0")
    else:
        monkeypatch.setattr(hugepages, "_kernel_allows", lambda: False)
    assert not hugepages.available()
    assert hugepages.moved(big) is big
    z = hugepages.zeros_like(big)
    assert torch.equal(z, torch.zeros_like(big))
    assert not _placed(z)


@needs_thp
def test_placed_parameters_train_save_and_load(tmp_path):
    torch.manual_seed(0)
    head = nn.Linear(64, 40_000)  # 10 MiB weight: placed; bias 160 kB: not
    before = {n: p.detach().clone() for n, p in head.named_parameters()}
    weight = head.weight
    assert hugepages.place(head) == ["weight"]
    assert head.weight is weight  # the same Parameter, new storage
    for n, p in head.named_parameters():
        assert torch.equal(p.detach(), before[n])
    assert _placed(head.weight) and _huge_kb(head.weight) > 0
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    head(torch.randn(3, 64)).sum().backward()
    opt.step()
    assert not torch.equal(head.weight.detach(), before["weight"])
    save_file({n: p.detach() for n, p in head.named_parameters()}, tmp_path / "h.safetensors")
    torch.save(head.state_dict(), tmp_path / "h.pt")
    for loaded in (load_file(tmp_path / "h.safetensors"), torch.load(tmp_path / "h.pt")):
        for n, p in head.named_parameters():
            assert torch.equal(loaded[n], p.detach())


@needs_thp
def test_memory_is_returned_when_the_tensor_is_freed():
    gc.collect()
    start = _rss_kb()
    t = hugepages.empty((64 << 20,), torch.float32)  # 256 MiB
    t.fill_(2.0)
    view = t[10:20]
    assert _rss_kb() - start > 200 << 10
    del t
    gc.collect()
    assert _rss_kb() - start > 200 << 10  # a view keeps the mapping
    assert float(view.sum()) == 20.0
    del view
    gc.collect()
    assert _rss_kb() - start < 50 << 10


@needs_thp
def test_row_sparse_sgd_keeps_large_momentum_buffers_in_huge_pages():
    w = nn.Parameter(torch.zeros(40_000, 64))
    opt = RowSparseSGD([w], lr=0.1, momentum=0.9)
    rows = torch.tensor([3, 17, 39_999])
    w.grad = torch.sparse_coo_tensor(rows[None], torch.ones(3, 64), w.shape, check_invariants=True)
    opt.step()
    assert _placed(opt.state[w]["momentum_buffer"]) and _huge_kb(opt.state[w]["momentum_buffer"]) > 0
    file = io.BytesIO()
    torch.save(opt.state_dict(), file)
    file.seek(0)
    saved = torch.load(file)  # as a checkpoint comes back: ordinary tensors
    assert not _placed(saved["state"][0]["momentum_buffer"])
    fresh = RowSparseSGD([w], lr=0.1, momentum=0.9)
    fresh.load_state_dict(saved)  # placed again
    buffer = fresh.state[w]["momentum_buffer"]
    assert torch.equal(buffer, opt.state[w]["momentum_buffer"])
    assert _placed(buffer) and _huge_kb(buffer) > 0


@needs_thp
@pytest.mark.parametrize("sampled", [0, 64])
def test_sampled_training_places_the_head(sampled):
    from logitsep.models import build_model
    from logitsep.train import TrainConfig, make_optimizer

    model = build_model("linear", (64,), 40_000, head="linear")  # a 10 MiB head
    weight = model.head.weight
    address = weight.data_ptr()
    config = TrainConfig(dataset="blobs", model="linear", loss="nce", steps=1, sampled=sampled)
    make_optimizer(model, config)
    assert model.head.weight is weight
    moved = weight.data_ptr() != address
    assert moved == bool(sampled)  # exact training leaves the head where torch made it
    assert _placed(weight) == bool(sampled)
    if sampled:
        assert _huge_kb(weight) > 0


@pytest.mark.parametrize(("top", "per_size", "mode"), [
    ("always [madvise] never", "always [inherit] madvise never", "madvise"),
    ("always [madvise] never", "[always] inherit madvise never", "always"),  # what CI's machine may have had
    ("[always] madvise never", "always inherit madvise [never]", "never"),
    ("always madvise [never]", "always inherit [madvise] never", "madvise"),
    ("[always] madvise never", None, "always"),  # a kernel before per-size control
    ("always madvise [never]", None, "never"),
])
def test_the_kernel_mode_is_the_2_mib_setting_where_there_is_one(top, per_size, mode, tmp_path, monkeypatch):
    (tmp_path / "enabled").write_text(top + "\n")
    (tmp_path / "hpage_pmd_size").write_text("2097152\n")
    if per_size is not None:
        (tmp_path / "hugepages-2048kB").mkdir()
        (tmp_path / "hugepages-2048kB" / "enabled").write_text(per_size + "\n")
        (tmp_path / "hugepages-64kB").mkdir()  # another size's setting does not count
        (tmp_path / "hugepages-64kB" / "enabled").write_text("[always] inherit madvise never\n")
    monkeypatch.setattr(hugepages, "_SYSFS", str(tmp_path / "enabled"))
    assert hugepages._mode() == mode
    (tmp_path / "enabled").unlink()
    assert hugepages._mode() == "never"  # no sysfs file: no transparent huge pages
