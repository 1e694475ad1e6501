"""Block metrics against one np.sort of the n*k float32 scores, in the same process (the ratio of issue 17).

    /usr/bin/time -v .venv/bin/python tools/blocks_vs_sort.py 10000 100000 64
"""
import resource
import sys
import time

import numpy as np
import torch

from logitsep.metrics import slc_metrics_blocked

torch.set_num_threads(1)
n, k, d = (int(a) for a in sys.argv[1:4])
g = torch.Generator().manual_seed(0)
h = torch.randn(n, d, generator=g)
W = torch.randn(k, d, generator=g) / d**0.5
b = torch.randn(k, generator=g) * 0.1
y = torch.randint(0, k, (n,), generator=g).numpy()
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB
base = rss()
def block(a, c):
    return torch.addmm(b[a:c], h, W[a:c].T).numpy()
t0 = time.perf_counter()
m = slc_metrics_blocked(block, k, y, progress=False)
t_blocked = time.perf_counter() - t0
peak_blocked = rss()
print(f"n={n} k={k} d={d}: blocked metrics {t_blocked:.1f} s, peak RSS {peak_blocked:.2f} GiB "
      f"(before: {base:.2f} GiB, features+head {(h.numel()+W.numel())*4/2**20:.1f} MiB)", flush=True)
print({key: round(v, 6) for key, v in m.items()}, flush=True)
t0 = time.perf_counter()
full = np.empty((n, k), dtype=np.float32)
for a in range(0, k, 4096):
    full[:, a:a + 4096] = block(a, min(a + 4096, k))
t_build = time.perf_counter() - t0
t0 = time.perf_counter()
full.reshape(-1).sort()  # np.sort of all n*k scores, in place (no second 4 GB copy)
t_sort = time.perf_counter() - t0
print(f"scores built in {t_build:.1f} s; one np.sort of the {n*k:,} float32 scores (in place) {t_sort:.1f} s; "
      f"blocked / sort = {t_blocked / t_sort:.2f}; peak RSS now {rss():.2f} GiB", flush=True)
