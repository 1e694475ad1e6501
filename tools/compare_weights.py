"""Compare two runs' weights tensor by tensor: one JSON object with the largest absolute difference of each tensor
and of all, and the largest magnitude, so that "equal up to float32 rounding" can be read off.

    python tools/compare_weights.py RUN_A/model.safetensors RUN_B/model.safetensors [--note TEXT]

Used by tools/gpu_checks.sh (one process against ``torchrun ... --shard-head``). Exit status 1 when the files
hold different tensor names or shapes.
"""

from __future__ import annotations

import argparse
import json
import sys

from safetensors.torch import load_file


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--note", default="")
    args = p.parse_args()
    a, b = load_file(args.a), load_file(args.b)
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        print(json.dumps({"error": "different tensors", "a": {k: list(v.shape) for k, v in a.items()},
                          "b": {k: list(v.shape) for k, v in b.items()}}))
        return 1
    diffs = {k: float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in sorted(a)}
    scale = max((float(v.double().abs().max()) for v in a.values() if v.numel()), default=0.0)
    print(json.dumps({"a": args.a, "b": args.b, "max_abs_diff": max(diffs.values(), default=0.0),
                      "max_abs_weight": scale, "per_tensor": diffs, "note": args.note}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
