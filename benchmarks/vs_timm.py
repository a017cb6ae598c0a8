"""Training step and inference of our Mixer against timm's ``MlpMixer``, interleaved in one process.

timm is not a dependency of mixer-study (PyPI's torchvision, which timm imports, does not load beside torch
2.13). Run this in a throwaway environment that sees the project's venv and has timm (docs/benchmarks.md
"Against timm" has the four commands). Both models go through the SAME step (``benchmarks.train_step.train_step_fn``:
schedule, autocast forward, sigmoid loss, exact global-norm clipping, foreach AdamW of ``build_optimizer``), on
the same synthetic batch, so the ratio measures the models' forward and backward only. The cases alternate
round by round so that all of them see the same background load; the figure is the median step time.

    python -m benchmarks.vs_timm --threads 2 --out bench-results/vs_timm.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

from benchmarks.common import format_table
from benchmarks.train_step import train_step_fn
from workers.config import OptimConfig
from workers.models.registry import build_model, forward_flops, train_flops_per_image
from workers.training.optim import build_optimizer
from workers.training.precision import cpu_has_fast_bf16
from workers.training.throughput import measured_matmul_flops

TIMM_NAMES = {"S-32": "mixer_s32_224", "S-16": "mixer_s16_224", "B-32": "mixer_b32_224", "B-16": "mixer_b16_224"}
NUM_CLASSES = 1000


class _TimmAsOurs(torch.nn.Module):
    """timm's model behind our forward signature: images -> (logits, {})."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x), {}


def _import_timm() -> ModuleType:
    """timm, or an exit that says how to get it (it is not a dependency of mixer-study)."""
    try:
        import timm
    except ImportError as exc:
        raise SystemExit(f"vs_timm: timm is not importable ({exc}); see docs/benchmarks.md 'Against timm'") from exc
    return timm


def _timm_model(name: str) -> torch.nn.Module:
    return _TimmAsOurs(_import_timm().create_model(TIMM_NAMES[name], num_classes=NUM_CLASSES))


def _cases(name: str, precision: str, compile_ours: bool) -> dict[str, tuple[torch.nn.Module, torch.nn.Module]]:
    """label -> (what runs the forward, the module holding the parameters)."""
    torch.manual_seed(0)
    ours = build_model(name, 224, NUM_CLASSES)
    cases = {"ours eager": (ours, ours), "timm eager": (_timm_model(name),) * 2}
    if compile_ours:
        torch.manual_seed(0)
        compiled = build_model(name, 224, NUM_CLASSES)
        cases["ours compiled"] = (torch.compile(compiled), compiled)
    return cases


def bench(name: str, batch: int, precision: str, rounds: int, compile_ours: bool, write) -> list[dict]:
    device = torch.device("cpu")
    optim = OptimConfig()
    images = torch.randn(batch, 3, 224, 224)
    labels = torch.randint(0, NUM_CLASSES, (batch,))
    steps, infers, warm_s = {}, {}, {}
    for label, (forward, module) in _cases(name, precision, compile_ours).items():
        module.train()
        optimizer = build_optimizer(module, optim)
        steps[label] = train_step_fn(module, optimizer, optim, NUM_CLASSES, precision, device, forward=forward)
        start = time.perf_counter()
        for _ in range(2):  # warm-up (and the compile)
            steps[label](images, labels)
        warm_s[label] = time.perf_counter() - start

        def infer(forward=forward, module=module):
            module.eval()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                forward(images)
            module.train()

        infers[label] = infer
        infer()
        write(f"[vs_timm] {name} {precision} {label}: warm-up {warm_s[label]:.1f} s")
    train_t = {label: [] for label in steps}
    infer_t = {label: [] for label in steps}
    for r in range(rounds):
        for label in steps:
            start = time.perf_counter()
            steps[label](images, labels)
            train_t[label].append(time.perf_counter() - start)
            start = time.perf_counter()
            infers[label]()
            infer_t[label].append(time.perf_counter() - start)
        write(f"[vs_timm] {name} {precision} round {r + 1}/{rounds}")
    timm_train, timm_infer = statistics.median(train_t["timm eager"]), statistics.median(infer_t["timm eager"])
    rows = []
    for label in steps:
        train_s, infer_s = statistics.median(train_t[label]), statistics.median(infer_t[label])
        rows.append({"variant": name, "precision": precision, "batch_size": batch, "case": label,
                     "train_ms": train_s * 1e3, "train_img_per_s": batch / train_s,
                     "train_flops_per_s": train_flops_per_image(name, 224, NUM_CLASSES) * batch / train_s,
                     "train_speed_over_timm": timm_train / train_s,
                     "infer_ms": infer_s * 1e3, "infer_img_per_s": batch / infer_s,
                     "infer_flops_per_s": forward_flops(name, 224, NUM_CLASSES) * batch / infer_s,
                     "infer_speed_over_timm": timm_infer / infer_s, "warmup_s": warm_s[label],
                     "rounds": rounds})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["S-32", "B-16"], choices=sorted(TIMM_NAMES))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 16], help="one per variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-compile", action="store_true", help="leave out our torch.compile'd model")
    parser.add_argument("--precisions", nargs="+", default=None, help="default: fp32, and bf16 where it is fast")
    parser.add_argument("--out", default="bench-results/vs_timm.json")
    args = parser.parse_args()
    timm = _import_timm()  # before the minutes of timing, not after them
    if len(args.batch_sizes) != len(args.variants):
        raise SystemExit(f"--batch-sizes needs one value per variant ({len(args.variants)}), got {args.batch_sizes}")
    torch.set_num_threads(args.threads)
    precisions = args.precisions or (["fp32", "bf16"] if cpu_has_fast_bf16() else ["fp32"])
    write = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    matmul = {p: measured_matmul_flops(p, args.threads, size=2048) for p in precisions}
    rows = []
    for name, batch in zip(args.variants, args.batch_sizes):
        for precision in precisions:
            for row in bench(name, batch, precision, args.rounds, not args.no_compile, write):
                row["train_utilisation"] = row["train_flops_per_s"] / matmul[precision]
                row["infer_utilisation"] = row["infer_flops_per_s"] / matmul[precision]
                rows.append(row)
    print(f"threads {args.threads}, torch {torch.__version__}, timm {timm.__version__}, "
          f"matmul 2048^3: " + ", ".join(f"{p} {v / 1e9:.1f} GFLOP/s" for p, v in matmul.items()))
    print(format_table(
        ["variant", "dtype", "batch", "case", "train ms", "x timm", "util", "infer ms", "x timm", "util", "warm-up s"],
        [[r["variant"], r["precision"], str(r["batch_size"]), r["case"], f"{r['train_ms']:.0f}",
          f"{r['train_speed_over_timm']:.2f}", f"{r['train_utilisation']:.2f}", f"{r['infer_ms']:.0f}",
          f"{r['infer_speed_over_timm']:.2f}", f"{r['infer_utilisation']:.2f}", f"{r['warmup_s']:.1f}"]
         for r in rows]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"cpu": platform.processor() or platform.machine(),
                                           "threads": args.threads, "torch": torch.__version__,
                                           "timm": timm.__version__, "cpu_has_fast_bf16": cpu_has_fast_bf16()},
                               "matmul_flops_per_s": matmul, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
