"""Does a trained model read its images? Loss on a stage's training samples with the right image, another
sample's image, and a black image.

    python scripts/image_reliance.py recipes/emma-tiny.yaml vqa runs/train/emma-tiny-v4c/vqa/final [-n 48]

A model that uses its images has a clearly lower loss with the right image than with another one; equal
losses mean the answers come from the text alone (what emma-tiny's first candidate did). Train samples
only: for the test split use `emma eval --ablate blank`.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from PIL import Image

from emma.model.registry import load_model
from emma.train.collator import VLCollator
from emma.train.data import stage_data
from emma.train.recipe import load_recipe


def mean_loss(model: Any, collator: VLCollator, examples: list[dict[str, Any]], batch: int = 8) -> float:
    """Mean per-sample loss (assistant tokens only) of ``examples``, bf16 autocast on the CPU."""
    total = 0.0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(0, len(examples), batch):
            chunk = examples[i : i + batch]
            total += float(model(**collator(chunk)).loss) * len(chunk)
    return total / len(examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("stage", help="stage name: its data (train split) is scored")
    parser.add_argument("model", help="model folder, e.g. the stage's final/")
    parser.add_argument("-n", type=int, default=48, help="samples (first n of the stage's seeded order)")
    args = parser.parse_args()

    recipe = load_recipe(args.recipe)
    names = [s.name for s in recipe.stages]
    if args.stage not in names:
        parser.error(f"no stage {args.stage!r} in the recipe (stages: {', '.join(names)})")
    index = names.index(args.stage)
    data = stage_data(recipe, recipe.stages[index], stage_index=index)
    loaded = load_model(args.model, device="cpu", dtype="fp32")
    model = loaded.model.eval()
    collator = VLCollator(loaded.processor, loaded.family, recipe.stages[index].max_length)
    examples = [dict(data[i]) for i in range(min(args.n, len(data)))]
    if len(examples) < 2:
        parser.error("need at least 2 samples")
    shift = max(1, len(examples) // 2)  # another sample's image (a different image unless duplicated)
    other = [dict(e, images=examples[(i + shift) % len(examples)]["images"]) for i, e in enumerate(examples)]
    black = [dict(e, images=[Image.new("RGB", im.size) for im in e["images"]]) for e in examples]
    real = mean_loss(model, collator, examples)
    print(f"{args.model} on {len(examples)} '{args.stage}' train samples:")
    print(f"  loss with the right image  {real:.3f}")
    print(f"  loss with another image    {mean_loss(model, collator, other):.3f}")
    print(f"  loss with a black image    {mean_loss(model, collator, black):.3f}")


if __name__ == "__main__":
    main()
