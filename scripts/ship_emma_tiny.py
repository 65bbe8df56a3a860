"""Ship a trained emma-tiny: write its delta on SmolLM2-135M-Instruct into the package's assets.

    python scripts/ship_emma_tiny.py runs/train/emma-tiny-v4c/vqa/final [--out src/emma/assets/emma-tiny]

Then check what ships: the delta is rebuilt into the full model on first use (`emma.model.emma_tiny.materialize`)
and the model that users get is the one to evaluate: `emma eval --task vqa-rad --model emma-tiny ...`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from emma.model.emma_tiny import export_delta

LIMIT_BYTES = 60 * 1000 * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trained", type=Path, help="merged model folder of the recipe's last stage (final/)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "src/emma/assets/emma-tiny"
    )
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    summary = export_delta(args.trained, args.out)
    total = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    print(
        f"delta {summary.bytes / 1e6:.1f} MB ({summary.tensors} tensors: {summary.low_rank} low-rank factor pairs "
        f"up to rank {summary.max_rank}, {summary.full} whole), shipped folder {total / 1e6:.1f} MB, "
        f"sha256 {summary.sha256}"
    )
    if total > LIMIT_BYTES:
        raise SystemExit(f"the shipped folder is {total / 1e6:.1f} MB, over the 60 MB limit")


if __name__ == "__main__":
    main()
