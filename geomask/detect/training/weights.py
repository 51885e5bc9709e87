"""Where a training run's weights start and how they are averaged: initialisation and EMA.

A run starts from a geomask checkpoint, from torchvision's COCO weights, or from scratch; the
class-specific heads are re-initialised when the class count differs. The moving average of the
weights (:class:`Ema`) is what validation and the written model use when ``ema_decay`` is set.
"""

from __future__ import annotations

import copy
import logging

import torch

from geomask.detect.architectures import coco_state_dict
from geomask.detect.checkpoint import load_checkpoint
from geomask.errors import WeightsError

log = logging.getLogger(__name__)


def init_weights(model: torch.nn.Module, init: str, num_classes: int, arch: str) -> list[str]:
    """Load a starting point, replacing the class-specific heads when the class count differs.

    Args:
        model: A freshly built model of ``arch`` for ``num_classes`` classes.
        init: A geomask checkpoint path, or ``coco``/``coco_v2`` (torchvision's COCO weights).
        num_classes: Object classes being trained (background excluded).
        arch: The model's architecture.

    Returns:
        The tensors left at their fresh initialisation because their shape differs from the source's
        (the class-specific predictors when the class counts differ).

    Raises:
        WeightsError: The source is unreadable or holds another architecture.
    """
    if init in ("coco", "coco_v2"):
        src_arch, state, _ = coco_state_dict(init)
        source = f"torchvision {init}"
    else:
        ckpt = load_checkpoint(init)
        src_arch = ckpt.meta.arch if ckpt.meta is not None else arch
        state, source = ckpt.state_dict, init
    if src_arch != arch:
        raise WeightsError(f"{source} holds a {src_arch!r} model but training uses arch {arch!r}; set --arch {src_arch}")
    own = model.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown:
        raise WeightsError(f"{source} does not fit architecture {arch!r} (e.g. unexpected key {unknown[0]!r}); set --arch to match")
    fitting = {k: v.to(own[k].dtype) for k, v in state.items() if v.shape == own[k].shape}
    replaced = sorted(k for k in state if k not in fitting)
    # Tensors the source lacks: BatchNorm step counters when it was trained with frozen BatchNorm (COCO).
    absent = [k for k in own if k not in state]
    model.load_state_dict(fitting, strict=False)
    log.info(
        "initialised from %s (%d tensors; %d re-initialised for %d classes; %d not in the source)",
        source,
        len(fitting),
        len(replaced),
        num_classes,
        len(absent),
    )
    return replaced


class Ema:
    """An exponential moving average of a model's weights (BatchNorm statistics included).

    The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` over the first updates, so the average
    is not dominated by the initial weights.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.steps = 0

    def load(self, state: dict[str, torch.Tensor], steps: int) -> None:
        self.model.load_state_dict(state)
        self.steps = steps

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for avg, cur in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True):
            if avg.is_floating_point():
                avg.mul_(d).add_(cur.detach(), alpha=1.0 - d)
            else:
                avg.copy_(cur)
