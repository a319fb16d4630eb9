"""Peak memory of per-token log-probs + entropy over a large vocabulary: the chunked ops of ``align.ops`` vs the
naive ``log_softmax(logits.float()).gather(...)`` and ``-(p * log p).sum(-1)``.

The logits (B*T rows of V columns, requiring grad as in training) exist before the measurement starts, as they do
after an LM head. Each variant runs in a fresh process; the kernel's resident high-water mark is reset once the
logits are allocated and touched, so the figure is the extra memory the computation needed on top of them. Both the
forward alone (log-probs + entropy: what a rollout or reference pass costs) and forward + backward of the log-probs
(a training step) are measured. A backward normally returns a logits-sized gradient buffer; the variant
``chunked_grad_in_logits`` writes it into the logits' own memory instead, as ``response_forward`` does in training
(on the LM head's output for the completion positions, which it scores whole rather than through a slice).

    python bench/memory_logprobs.py                           # V=32000, B*T=16384, fp32 and bf16 logits
    python bench/memory_logprobs.py --vocab 1000 --tokens 512 # smoke test
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Result, base_parser, peak_rss_bytes, reset_peak_rss, rss_bytes, write_json

VARIANTS = ("naive", "chunked", "chunked_grad_in_logits")


def child(variant: str, vocab: int, tokens: int, dtype_name: str, backward: bool) -> dict[str, float]:
    import torch

    from align.ops import entropy_from_logits, selective_log_softmax

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    torch.manual_seed(0)

    def compute(logits: Any, ids: Any) -> Any:
        if variant == "naive":
            logp_all = torch.log_softmax(logits.float(), dim=-1)
            logp = logp_all.gather(-1, ids[:, None]).squeeze(-1)
            with torch.no_grad():
                entropy = -(logp_all.exp() * logp_all).sum(-1)
        else:
            # entropy first: with grad_in_logits the backward overwrites the logits (as in response_forward,
            # where nothing reads them afterwards)
            entropy = entropy_from_logits(logits.detach())
            logp = selective_log_softmax(logits, ids, grad_in_logits=variant == "chunked_grad_in_logits")
        if backward:
            logp.sum().backward()
        return entropy

    # warm-up on a few rows: kernels and libraries are paged in before the high-water mark is reset
    compute(torch.randn(8, vocab, dtype=dtype).requires_grad_(True), torch.randint(0, vocab, (8,)))
    logits = torch.randn(tokens, vocab, dtype=dtype).requires_grad_(True)
    ids = torch.randint(0, vocab, (tokens,))
    before = rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    entropy = compute(logits, ids)
    elapsed = time.perf_counter() - start
    peak = peak_rss_bytes()
    assert torch.isfinite(entropy).all()
    return {"extra_peak_mb": (peak - before) / 2**20, "logits_mb": logits.numel() * logits.element_size() / 2**20,
            "seconds": elapsed}


def measure(vocab: int, tokens: int, dtype_name: str, backward: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for variant in VARIANTS if backward else VARIANTS[:2]:  # the in-place variant differs only in the backward
        cmd = [sys.executable, __file__, "--child", variant, "--vocab", str(vocab), "--tokens", str(tokens),
               "--dtype", dtype_name] + (["--backward"] if backward else [])
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"{variant} ({dtype_name}) failed:\n{run.stderr[-2000:]}")
        out[variant] = json.loads(run.stdout.strip().splitlines()[-1])
    out["ratio_extra_peak"] = out["chunked"]["extra_peak_mb"] / out["naive"]["extra_peak_mb"]
    if backward:
        out["ratio_extra_peak_grad_in_logits"] = (out["chunked_grad_in_logits"]["extra_peak_mb"]
                                                  / out["naive"]["extra_peak_mb"])
    return out


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=16384, help="B*T rows of logits")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--child", choices=VARIANTS, help="(internal) run one variant in this process")
    parser.add_argument("--dtype", default="fp32", help="(internal)")
    parser.add_argument("--backward", action="store_true", help="(internal)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.vocab, args.tokens, args.dtype, args.backward)))
        return
    figures: dict[str, Any] = {}
    for dtype_name in args.dtypes.split(","):
        for backward in (False, True):
            key = f"{dtype_name}_{'forward_backward' if backward else 'forward'}"
            figures[key] = measure(args.vocab, args.tokens, dtype_name, backward)
            print(f"  {key}: chunked/naive extra peak = {figures[key]['ratio_extra_peak']:.3f}", flush=True)
    result = Result("logprob_entropy_peak_memory", figures,
                    {"vocab": args.vocab, "tokens": args.tokens, "measure": "extra peak RSS over the logits"})
    result.show()
    write_json(args.json, [result])


if __name__ == "__main__":
    main()
