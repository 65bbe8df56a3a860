"""How a trained model's image tokens compare with its word embeddings (the scale and sameness of them).

    python scripts/image_token_stats.py MODEL_DIR DATASET_DIR [--images 6]

For ``--images`` train images of a canonical dataset (sorted by file name), prints the mean norm of the
projector's image tokens, the mean norm of the language model's input embeddings, and the cosine
similarity of each image's mean token to the first image's (near 1: every image looks alike to the LM),
and the mean pairwise cosine of the per-image mean tower features and image tokens (where the tower still
tells images apart and the projector no longer does). ``--images 0``: every image of the dataset.
Families with a ``linear_1 → act → linear_2`` projector on a tower whose output has ``last_hidden_state``
B x C x H x W (FastVLM: emma-tiny).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from emma.model.registry import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--images", type=int, default=6)
    args = parser.parse_args()
    loaded = load_model(str(args.model), device="cpu", dtype="fp32")
    model, processor = loaded.model, loaded.processor
    files = sorted((args.dataset / "images").glob("*/*"))[: args.images or None]
    feature_rows, token_rows = [], []
    with torch.no_grad():
        for i in range(0, len(files), 16):
            pixels = processor.image_processor(
                images=[Image.open(f).convert("RGB") for f in files[i : i + 16]], return_tensors="pt"
            )["pixel_values"]
            rows = model.model.vision_tower(pixels).last_hidden_state.flatten(2).transpose(1, 2)
            feature_rows.append(rows)
            token_rows.append(model.model.multi_modal_projector(rows))
        features, tokens = torch.cat(feature_rows), torch.cat(token_rows)
        text = model.get_input_embeddings().weight
    means = tokens.mean(1)
    cosine = torch.nn.functional.cosine_similarity(means[:1], means[1:], dim=-1)
    print(f"image token norm (mean): {float(tokens.norm(dim=-1).mean()):.2f}")
    print(f"word embedding norm (mean): {float(text.norm(dim=-1).mean()):.2f}")
    first = [round(float(c), 4) for c in cosine[:8]]
    print(f"cosine of the first images' mean tokens to the first one's: {first}")
    for name, values in (("tower feature", features.mean(1)), ("image token", means)):
        unit = torch.nn.functional.normalize(values, dim=-1)
        pairs = unit @ unit.T
        off = pairs[~torch.eye(len(values), dtype=torch.bool)]
        print(f"mean pairwise cosine of per-image mean {name}s: {float(off.mean()):.4f}")


if __name__ == "__main__":
    main()
