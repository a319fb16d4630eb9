"""Peak GEMM throughput of this machine: FLOP/s of ``torch.matmul`` at fp32 and bf16, the ceiling that the GRPO
update's achieved FLOP/s (``bench/grpo_vs_trl.py``) is compared against.

One product (M x K) @ (K x N) counts 2 * M * K * N FLOPs (a multiply and an add per term). Each shape runs with
preallocated operands and output (``out=``), so the timing is the GEMM kernel alone, not the allocator; every
repeat times a loop of products lasting at least ``--min-seconds``, after one untimed product (kernel selection,
pages touched). The figure of a shape is the median over ``--repeats`` repeats, with the interquartile range; the
machine's peak at a dtype is the best (shape, layout)'s median. Shapes: squares (``--sizes``) and the shapes of a
SmolLM2-135M layer over a batch of tokens (``--shapes``: tokens x 576 @ 576 x 1536, the MLP up/gate projection,
and its down projection). Threads: whatever torch is set to (``--threads``, else OMP_NUM_THREADS).

Layouts: a linear layer's three products, as autograd runs them with row-major tensors: ``nt`` the forward x @ W.T
(W stored N x K), ``nn`` the input gradient g @ W, ``tn`` the weight gradient g.T @ x. On fp32 they differ by up
to 2x here; in bf16 by 20x, since a CPU without bf16 instructions (AVX2 only, such as the AMD EPYC of
docs/benchmarks.md) has no fast bf16 kernel for some of them. A (dtype, layout) whose next shape would take more
than ``--max-product-seconds`` at the rate it reached so far skips that shape and the larger ones (listed as
skipped): it is far below the peak, and a 2048^3 bf16 product at 0.5 GFLOP/s would take half a minute.

    python bench/gemm_peak.py --json docs/bench-results/gemm_peak.json       # about a minute
    python bench/gemm_peak.py --sizes 64,128 --shapes 32x64x96 --repeats 2 --min-seconds 0.01   # smoke test
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Result, base_parser, iqr, median, set_threads, write_json

DTYPES = ("fp32", "bf16")
LAYOUTS = ("nt", "nn", "tn")  # forward x @ W.T, input gradient g @ W, weight gradient g.T @ x
DEFAULT_SIZES = (512, 1024, 1536, 2048)
DEFAULT_SHAPES = ((1024, 576, 1536), (1024, 1536, 576))  # (tokens x hidden) @ (hidden x MLP) and back


def _torch_dtype(name: str) -> Any:
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def time_gemm(m: int, k: int, n: int, dtype: str, repeats: int, min_seconds: float,
              layout: str = "nn") -> list[float]:
    """Seconds per (m x k) @ (k x n) product, one figure per repeat (each the mean over a loop of at least
    ``min_seconds``). ``layout``: per operand, ``n`` row-major as written, ``t`` the transpose of a row-major
    tensor (a view, as a weight W (n x k) enters x @ W.T)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    dt = _torch_dtype(dtype)
    a = torch.randn(m, k, generator=gen).to(dt) if layout[0] == "n" else torch.randn(k, m, generator=gen).to(dt).t()
    b = torch.randn(k, n, generator=gen).to(dt) if layout[1] == "n" else torch.randn(n, k, generator=gen).to(dt).t()
    out = torch.empty(m, n, dtype=dt)
    torch.matmul(a, b, out=out)  # untimed: kernel choice, operands and output paged in
    start = time.perf_counter()
    torch.matmul(a, b, out=out)
    once = max(time.perf_counter() - start, 1e-9)
    loops = max(1, int(min_seconds / once))  # fixed per shape, so every repeat does the same work
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            torch.matmul(a, b, out=out)
        times.append((time.perf_counter() - start) / loops)
    return times


def measure_peak(dtypes: tuple[str, ...] = DTYPES, sizes: tuple[int, ...] = DEFAULT_SIZES,
                 shapes: tuple[tuple[int, int, int], ...] = DEFAULT_SHAPES, repeats: int = 5,
                 min_seconds: float = 0.2, max_product_seconds: float = 1.0, layouts: tuple[str, ...] = LAYOUTS,
                 log: Any = print) -> dict[str, Any]:
    """Per dtype: every (shape, layout)'s median FLOP/s (with IQR) and the peak (the best of them). Returns
    ``{"method": str, "torch_threads": int, "<dtype>": {"shapes": [...], "skipped": [...], "peak_flop_per_s":
    float, "best": {"m", "k", "n", "layout"}}}``; rates in FLOP per second (not G)."""
    import torch

    out: dict[str, Any] = {
        "method": (f"torch.matmul(A (m x k), B (k x n), out=C), 2*m*k*n FLOPs per product, layouts {list(layouts)} "
                   f"(nt: x @ W.T, nn: g @ W, tn: g.T @ x); median over {repeats} repeats of a loop of >= "
                   f"{min_seconds} s; peak = the best (shape, layout); a (dtype, layout) skips shapes predicted to "
                   f"take > {max_product_seconds} s per product"),
        "torch_threads": torch.get_num_threads(),
    }
    every = sorted({(s, s, s) for s in sizes} | set(shapes), key=lambda x: x[0] * x[1] * x[2])
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise SystemExit(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        rows: list[dict[str, Any]] = []
        skipped: list[dict[str, Any]] = []
        for layout in layouts:
            if layout not in LAYOUTS:
                raise SystemExit(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
            best_rate = 0.0
            for m, k, n in every:
                flops = 2.0 * m * k * n
                if best_rate and flops / best_rate > max_product_seconds:
                    skipped.append({"m": m, "k": k, "n": n, "layout": layout,
                                    "predicted_seconds": flops / best_rate})
                    continue
                times = time_gemm(m, k, n, dtype, repeats, min_seconds, layout)
                rates = [flops / t for t in times]
                best_rate = max(best_rate, median(rates))
                rows.append({"m": m, "k": k, "n": n, "layout": layout, "seconds": median(times),
                             "flop_per_s": median(rates), "flop_per_s_iqr": iqr(rates)})
                log(f"  {dtype} {layout} {m}x{k} @ {k}x{n}: {median(rates) / 1e9:.2f} GFLOP/s")
        best = max(rows, key=lambda r: r["flop_per_s"])
        out[dtype] = {"shapes": rows, "skipped": skipped, "peak_flop_per_s": best["flop_per_s"],
                      "best": {key: best[key] for key in ("m", "k", "n", "layout")}}
    return out


def parse_shapes(text: str) -> tuple[tuple[int, int, int], ...]:
    """``"1024x576x1536,64x64x64"`` -> ((1024, 576, 1536), (64, 64, 64)): M x K x N per product."""
    shapes = []
    for part in filter(None, text.split(",")):
        dims = part.lower().split("x")
        if len(dims) != 3 or not all(d.isdigit() and int(d) > 0 for d in dims):
            raise SystemExit(f"--shapes: {part!r} is not MxKxN (three positive integers, e.g. 1024x576x1536)")
        shapes.append((int(dims[0]), int(dims[1]), int(dims[2])))
    return tuple(shapes)


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated: fp32, bf16")
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="square sizes, comma-separated")
    parser.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in DEFAULT_SHAPES),
                        help="extra MxKxN shapes, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=0.2, help="shortest timed loop per repeat")
    parser.add_argument("--max-product-seconds", type=float, default=1.0,
                        help="skip shapes a (dtype, layout) would take longer than this for, per product")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated: nt, nn, tn")
    args = parser.parse_args()
    set_threads(args.threads)
    try:
        sizes = tuple(int(s) for s in args.sizes.split(",") if s)
    except ValueError:
        raise SystemExit(f"--sizes: {args.sizes!r} is not a comma-separated list of integers") from None
    shapes = parse_shapes(args.shapes)
    figures = measure_peak(tuple(d for d in args.dtypes.split(",") if d), sizes, shapes, args.repeats,
                           args.min_seconds, args.max_product_seconds, tuple(x for x in args.layouts.split(",") if x))
    result = Result("gemm_peak", figures, {"sizes": list(sizes), "shapes": [list(x) for x in shapes],
                                           "repeats": args.repeats, "min_seconds": args.min_seconds,
                                           "max_product_seconds": args.max_product_seconds})
    for dtype in DTYPES:
        if dtype in figures:
            b = figures[dtype]["best"]
            print(f"{dtype} peak: {figures[dtype]['peak_flop_per_s'] / 1e9:.1f} GFLOP/s ({b['m']}x{b['k']} @ "
                  f"{b['k']}x{b['n']}, layout {b['layout']}, {figures['torch_threads']} thread(s))")
    write_json(args.json, [result])


if __name__ == "__main__":
    main()
