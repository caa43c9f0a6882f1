"""Attention benchmark: cascade_kernels.attention vs PyTorch SDPA (flash and efficient backends) on the cascade's shapes.

    python bench/attention.py [--batches 2 8] [--dtype float16] [--json bench/results/attention_h100.json]
    TRITON_INTERPRET=1 python bench/attention.py --smoke    # CPU: tiny shapes, checks the script, times nothing real

Shapes come from engine/configs/real_size.json (the real IF architectures), not from a hand-written list: for IF-I-XL at 64x64 and
IF-II-L at 256x256, every block with attention gives (heads = channels / 64, Lq = tokens of its resolution,
Lk = 77 text tokens + Lq), head dim 64, no mask. Then long self-attention at 4096 and 16384 tokens, head dim
64 and 128. Every implementation is checked against a float32 reference before it is timed.

Reported per shape and implementation: median milliseconds over --iters CUDA-event-timed calls after warm-up,
TFLOP/s (4 * B * H * Lq * Lk * D flops: two matmuls), and % of the fp16 matmul peak measured in the same run
(8192^3 torch.mm). One run measures everything, so ratios between columns are fair; absolute figures vary
between machines and runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from engine.bench.report import command_line, save_json

from engine.bench.roofline import matmul_peak_tflops
from engine.bench.timing import interleaved
from engine.text import MAX_TOKENS as TEXT_TOKENS

from cascade_kernels import attention, reference_attention

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "engine" / "configs" / "real_size.json"  # the published architectures (engine/bench/real_size.py)
HEAD_DIM = 64  # IF's attention_head_dim
LONG_TOKENS = (4096, 16384)
LONG_HEAD_DIMS = (64, 128)


def cascade_shapes(configs: dict) -> list[dict]:
    """One entry per distinct (model, resolution) with attention: heads, Lq, Lk, D."""
    shapes = []
    for model in ("IF-I-XL", "IF-II-L"):
        unet = configs[f"{model}/unet"]
        for level, (block, channels) in enumerate(zip(unet["down_block_types"], unet["block_out_channels"])):
            if "CrossAttn" not in block:
                continue
            side = unet["sample_size"] >> level  # each down block before this one halves the side
            tokens = side * side
            shapes.append({"name": f"{model} {side}x{side}", "heads": channels // unet["attention_head_dim"],
                           "lq": tokens, "lk": TEXT_TOKENS + tokens, "d": unet["attention_head_dim"]})
    return shapes


def long_shapes() -> list[dict]:
    return [{"name": f"self {n} d{d}", "heads": 16 if d == 64 else 8, "lq": n, "lk": n, "d": d}
            for n in LONG_TOKENS for d in LONG_HEAD_DIMS]


def sdpa_with(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return run


def implementations() -> dict:
    from torch.nn.attention import SDPBackend

    return {"ours": lambda q, k, v: attention(q, k, v),
            "sdpa_flash": sdpa_with(SDPBackend.FLASH_ATTENTION),
            "sdpa_efficient": sdpa_with(SDPBackend.EFFICIENT_ATTENTION)}


def time_ms(fn, iters: int, warmup: int) -> float:
    """Median milliseconds of fn(); CUDA events on GPU, wall clock on CPU (engine.bench.timing)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return statistics.median(interleaved({"fn": fn}, iters, warmup, device)["fn"]) * 1e3


def measure(shape: dict, batch: int, dtype, device, iters: int, warmup: int, peak: float) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)

    def draw(length):  # (B, H, L, D), scaled like activations after a projection
        return torch.randn(batch, shape["heads"], length, shape["d"], generator=gen).to(device, dtype)

    q, k, v = draw(shape["lq"]), draw(shape["lk"]), draw(shape["lk"])
    expected = reference_attention(q.float(), k.float(), v.float())
    flops = 4 * batch * shape["heads"] * shape["lq"] * shape["lk"] * shape["d"]
    row = {**shape, "batch": batch, "flops": flops, "results": {}}
    for name, fn in implementations().items():
        try:
            error = (fn(q, k, v).float() - expected).abs().max().item()
        except RuntimeError as exc:  # e.g. flash SDPA has no CPU or float32 kernel on some builds
            row["results"][name] = {"unsupported": str(exc).splitlines()[0][:120]}
            continue
        ms = time_ms(lambda fn=fn: fn(q, k, v), iters, warmup)
        tflops = flops / ms / 1e9
        row["results"][name] = {"ms": ms, "tflops": tflops, "pct_peak": 100 * tflops / peak, "max_abs_err": error}
    return row


def table(rows: list[dict], peak: float) -> str:
    names = list(implementations())
    lines = [f"matmul peak {peak:.0f} TFLOP/s",
             "| shape | B | H | Lq | Lk | D | " + " | ".join(f"{n} ms (TFLOP/s, % peak)" for n in names)
             + " | ours vs best SDPA |",
             "|" + " --- |" * (7 + len(names))]
    for row in rows:
        cells, sdpa_ms = [], []
        for name in names:
            r = row["results"][name]
            if "ms" not in r:
                cells.append("n/a")
                continue
            cells.append(f"{r['ms']:.3f} ({r['tflops']:.0f}, {r['pct_peak']:.0f}%)")
            if name != "ours":
                sdpa_ms.append(r["ms"])
        ours = row["results"]["ours"].get("ms")
        ratio = f"{min(sdpa_ms) / ours:.2f}x" if ours and sdpa_ms else "n/a"
        lines.append(f"| {row['name']} | {row['batch']} | {row['heads']} | {row['lq']} | {row['lk']} | {row['d']} | "
                     + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and counts: checks the script on CPU")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    if args.smoke:
        shapes = [{"name": "smoke joint", "heads": 2, "lq": 16, "lk": 16 + 5, "d": 32}]
        batches, iters, warmup, peak_n = [1], 2, 1, 256
    else:
        if device == "cpu":
            parser.error("the full benchmark needs a CUDA GPU; use --smoke on CPU")
        shapes = cascade_shapes(json.loads(CONFIGS.read_text())) + long_shapes()
        batches, iters, warmup, peak_n = args.batches, args.iters, args.warmup, 8192
    peak = matmul_peak_tflops(torch.device(device), dtype, peak_n, iters)
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "triton": __import__("triton").__version__, "dtype": args.dtype,
        "command": command_line(argv, "attention.py"),
        "matmul_peak_tflops": peak, "complete": False, "rows": [],
    }
    todo = [(s, b) for s in shapes for b in (batches if s["name"].startswith("IF") or args.smoke else [1])]
    for k, (shape, batch) in enumerate(todo):
        report["rows"].append(measure(shape, batch, dtype, device, iters, warmup, peak))
        report["complete"] = k + 1 == len(todo)
        save_json(report, args.json)  # after every shape: a run stopped early keeps what it measured
    print(table(report["rows"], peak))
    return report


if __name__ == "__main__":
    main()
