"""What one decode step's attention call costs per SDPA backend, for a shape seen before and for
a new one, side by side in one run.

    python benchmarks/sdpa_shapes.py [--device cuda] [--dtype bfloat16] [--rows 32,160]
           [--kv 256,1024] [--calls 40] [--output FILE]

Decoding changes the KV length at every step, and a search's running batch changes its rows
too, so nearly every attention call has a shape the process has not seen. Each backend is timed
on decode-shaped inputs (one query token; SmolLM2's 9 heads of 64; a boolean padding mask): the
mean ms per call repeating one shape, and per call when every call has a KV length not seen
before (distinct lengths per backend, so no backend inherits another's cached plans). "qstar"
is what qstar's models use: the default choice after pipeline.lm.models.cuda_attention.
Writes benchmarks/results/sdpa_shapes_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from pipeline.lm.models import cuda_attention  # noqa: E402
from pipeline.run.atomic import write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
HEADS, HEAD_DIM = 9, 64  # SmolLM2-135M (its 3 KV heads repeated to 9, as transformers does)
BACKENDS = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "math": SDPBackend.MATH, "qstar": None}


def inputs(rows: int, kv: int, device: str, dtype: torch.dtype):
    gen = torch.Generator(device="cpu").manual_seed(kv)
    q = torch.randn(rows, HEADS, 1, HEAD_DIM, generator=gen).to(device, dtype)
    k = torch.randn(rows, HEADS, kv, HEAD_DIM, generator=gen).to(device, dtype)
    v = torch.randn(rows, HEADS, kv, HEAD_DIM, generator=gen).to(device, dtype)
    mask = (torch.rand(rows, 1, 1, kv, generator=gen) > 0.2).to(device)  # padding mid-row
    return q, k, v, mask


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def per_call_ms(batches, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    for q, k, v, mask in batches:
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    sync(device)
    return round((time.perf_counter() - start) * 1000 / len(batches), 3)


def measure(backend: str, index: int, rows: int, kv: int, args, dtype) -> dict | str:
    if backend == "qstar":
        cuda_attention(args.device)  # process-wide: the last backend measured
    kernel = BACKENDS[backend]
    context = sdpa_kernel([kernel]) if kernel is not None else nullcontext()
    same = inputs(rows, kv, args.device, dtype)
    fresh = [inputs(rows, kv + (index + 1) * args.calls + j, args.device, dtype)
             for j in range(args.calls)]  # lengths no other backend sees
    try:
        with context:
            per_call_ms([same] * 3, args.device)  # warm-up: this shape's plan, if any
            return {"same_shape_ms": per_call_ms([same] * args.calls, args.device),
                    "new_shape_ms": per_call_ms(fresh, args.device)}
    except RuntimeError as exc:
        return f"unavailable: {str(exc).splitlines()[0][:100]}"


def positive_ints(text: str) -> list[int]:
    """argparse type: comma-separated positive integers (a bad value is one line, exit 2)."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated integers, e.g. 32,160") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value at least 1")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rows", type=positive_ints, default="32,160", help="comma-separated batch rows")
    parser.add_argument("--kv", type=positive_ints, default="256,1024", help="comma-separated KV lengths")
    parser.add_argument("--calls", type=int, default=40, help="calls timed per measurement")
    parser.add_argument("--output", default=None, help="JSON path (default under benchmarks/results)")
    args = parser.parse_args()
    if args.calls < 1:
        parser.error(f"--calls={args.calls}: at least 1")
    dtype = getattr(torch, args.dtype)
    shapes = [(rows, kv) for rows in args.rows for kv in args.kv]
    results = []
    for rows, kv in shapes:
        row = {"rows": rows, "kv": kv}
        for index, backend in enumerate(b for b in BACKENDS if b != "qstar"):
            row[backend] = measure(backend, index, rows, kv, args, dtype)
        results.append(row)
        print(json.dumps(row), flush=True)
    for row in results:  # after every other backend: cuda_attention's switch is process-wide
        row["qstar"] = measure("qstar", len(BACKENDS), row["rows"], row["kv"], args, dtype)
        print(f"rows {row['rows']} kv {row['kv']}: qstar {row['qstar']}, default {row['default']}")
    result = {"benchmark": "sdpa_shapes", "device": args.device, "dtype": args.dtype,
              "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "calls": args.calls, "results": results}
    write_json(Path(args.output) if args.output else RESULTS / f"sdpa_shapes_{args.device}.json",
               result)


if __name__ == "__main__":
    main()
