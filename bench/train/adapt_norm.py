"""Re-estimate a checkpoint's batch-norm statistics on unlabelled target imagery (AdaBN), for measuring.

Usage: python bench/train/adapt_norm.py CKPT IMAGE.tif [IMAGE.tif ...] -o OUT.pt

Batch norm's running means and variances are the training cities' feature statistics; on a new city
they are off (colour, roof material, light). AdaBN (Li et al., "Revisiting Batch Normalization For
Practical Domain Adaptation", 2016) replaces them with the statistics of the target imagery itself —
no labels, so a user could do it on their own image. This script does exactly that: every tile of the
images (side by side, at the checkpoint's tile size, on ``predict``'s working grid and normalisation) goes through the model's
backbone with batch norm in training mode and a cumulative average (``momentum=None``); the weights are
unchanged, only the ``running_mean``/``running_var`` buffers are replaced. The result is scored like any
fold model (``bench/train/eval_buildings.sh OUT.pt``).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from rasterio.windows import Window
from torch import nn

from geomask.config import Config
from geomask.detect.architectures import build_model, load_weights
from geomask.detect.checkpoint import load_checkpoint, save_checkpoint
from geomask.pipeline import DEFAULT_TILE_SIZE_PX, plan_raster, resolve_config


def tiles(path: str, config: Config, size: int) -> list[torch.Tensor]:
    """Every full, mostly valid ``size``² tile of ``path`` side by side, read as ``predict`` reads them."""
    plan = plan_raster(path, config)  # predict's working grid, bands and normalisation
    out = []
    with plan.reader() as reader:
        for row in range(0, plan.grid.height - size + 1, size):
            for col in range(0, plan.grid.width - size + 1, size):
                pixels, valid = reader.read(Window(col, row, size, size))
                if valid.mean() > 0.5:
                    out.append(torch.from_numpy(np.ascontiguousarray(pixels)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("images", nargs="+")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    assert ckpt.meta is not None
    hints = ckpt.meta.hints()
    size = hints.tile_size_px or DEFAULT_TILE_SIZE_PX
    model = build_model(ckpt.meta.arch, len(ckpt.meta.classes), size)
    load_weights(model, ckpt.state_dict, args.checkpoint, ckpt.meta.arch)  # cast to the model's float32
    model.eval()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over every batch
        m.train()
    config = resolve_config(Config(), hints)
    batch = [t for p in args.images for t in tiles(p, config, size)]
    torch.manual_seed(0)
    order = torch.randperm(len(batch)).tolist()
    with torch.no_grad():
        for i in range(0, len(order), args.batch):
            images, _ = model.transform([batch[j] for j in order[i : i + args.batch]])
            model.backbone(images.tensors)
    save_checkpoint(args.output, ckpt.meta, model.state_dict())
    print(f"{args.output}: batch-norm statistics of {len(norms)} layers from {len(batch)} tiles of {len(args.images)} images")


if __name__ == "__main__":
    main()
