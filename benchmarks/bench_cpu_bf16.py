"""Why emma-tiny trains in fp32 on this CPU: its ResNet-152 tower in fp32 against bf16 autocast.

    python benchmarks/bench_cpu_bf16.py [--images 2] [--runs 3] [--out benchmarks/results/bench_cpu_bf16.json]

The tower is emma-tiny's (Astra's ResNet-152 from its package, converted by emma.model.vision_encoders),
on ``--images`` random 224x224 images, in eval mode under ``torch.no_grad``; after one warm-up call per
mode, ``--runs`` timed calls each, interleaved, medians and the bf16/fp32 ratio. On a CPU without
AVX512-BF16 (``/proc/cpuinfo`` flags are recorded) bf16 autocast falls back to slow convolution kernels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import ResNetModel

from emma.model.vision_encoders import astra_resnet_config, load_astra_encoder_state


def _flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return sorted({flag for flag in text.split() if flag in wanted})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_cpu_bf16.json"))
    args = parser.parse_args()
    model = ResNetModel(astra_resnet_config()).eval()
    model.load_state_dict(load_astra_encoder_state())
    pixels = torch.rand(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    def run(bf16: bool) -> float:
        start = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(pixels)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"fp32": [], "bf16_autocast": []}
    run(False), run(True)  # warm-up
    for _ in range(args.runs):
        times["fp32"].append(run(False))
        times["bf16_autocast"].append(run(True))
    per_image = {k: statistics.median(v) / args.images for k, v in times.items()}
    result = {
        "images": args.images,
        "runs": args.runs,
        "cpu_flags": _flags(),
        "torch": torch.__version__,
        "seconds_per_image_median": per_image,
        "ratio_bf16_over_fp32": per_image["bf16_autocast"] / per_image["fp32"],
        "raw_seconds": times,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"ResNet-152 tower, {args.images} images, medians of {args.runs}: fp32 {per_image['fp32']:.3f} s/image, "
        f"bf16 autocast {per_image['bf16_autocast']:.3f} s/image ({result['ratio_bf16_over_fp32']:.1f}x); "
        f"cpu flags {result['cpu_flags']} → {args.out}"
    )


if __name__ == "__main__":
    main()
