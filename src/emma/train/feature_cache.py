"""Frozen vision towers stay in eval mode and compute each image's features once: a per-image cache of the tower's output.

When a stage leaves the vision tower frozen (alignment, or instruction/VQA without ``train_vision``), the
tower's output for an image never changes during training, yet the Trainer would recompute it at every
step of every epoch (emma-tiny's ResNet-152: ~0.2 s an image on a 2-core CPU, more than the language
model's step). :meth:`TowerFeatureCache.attach` pins the tower in eval mode (a frozen tower's batch-norm
statistics must not drift with the training batches, which ``model.train()`` would allow) and replaces its ``forward`` on that instance with
one that looks each image up by the SHA-1 of its pixel tensor (so a different augmentation or resize is a
different entry) and runs the tower only on the images it has not seen. Parameters, module names and the
state dict are untouched, so checkpoints and the saved model are exactly those of an uncached run.

One cache can serve several stages (``emma train`` passes the same one to each stage) because every entry
is also keyed by a fingerprint of the tower's weights: a tower that changed gets fresh entries.
Families whose projector lives inside the vision module (Qwen-VL's ``merger``) are not cached.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from emma.train.freeze import _PEFT_PREFIX, _under, projector_modules, vision_modules

__all__ = ["TowerFeatureCache", "frozen_tower", "pin_tower_eval", "tower_module"]

_TYPE = "__output_type__"


def tower_module(model: Any, family: str) -> Any | None:
    """The vision tower module when the family has one that holds no projector part, else None."""
    towers = vision_modules(family)
    if len(towers) != 1 or any(_under(p, towers[0]) for p in projector_modules(family)):
        return None
    for name, module in model.named_modules():
        if name.removeprefix(_PEFT_PREFIX) == towers[0]:
            return module
    return None


def frozen_tower(model: Any, family: str) -> Any | None:
    """The vision tower module when it is frozen and holds no projector part, else None."""
    module = tower_module(model, family)
    if module is None:
        return None
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        return module
    return None


def _pin_eval(tower: Any) -> Callable[[], None]:
    """Keep ``tower`` (all its submodules) in eval mode through the Trainer's ``model.train()`` calls."""
    tower.eval()
    tower.train = lambda mode=True: tower  # type: ignore[method-assign,assignment]
    return lambda: vars(tower).pop("train", None)


def pin_tower_eval(model: Any, family: str, partly_frozen: bool = False) -> Callable[[], None] | None:
    """Keep a frozen vision tower (or, with ``partly_frozen``, one of which a stage trains only some
    submodules) in eval mode, so that its batch-norm statistics stay the pretrained ones under the
    Trainer's ``model.train()``; returns the function that undoes it, or None (a tower that trains whole,
    or none to pin). For trainers that do not cache the tower (GRPO): :meth:`TowerFeatureCache.attach`
    pins it too."""
    tower = frozen_tower(model, family) or (tower_module(model, family) if partly_frozen else None)
    return _pin_eval(tower) if tower is not None else None


def _fingerprint(module: Any) -> bytes:
    """SHA-1 of the tower's weights and buffers (a changed tower never reuses another's entries)."""
    import torch

    digest = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        if value.dtype not in (torch.int64, torch.int32, torch.bool):
            value = value.float()
        digest.update(name.encode())
        digest.update(value.numpy().tobytes())
    return digest.digest()


def _slice(value: Any, index: int) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value[index].detach().clone()
    if isinstance(value, tuple):
        return tuple(_slice(v, index) for v in value)
    return value


def _stack(values: list[Any]) -> Any:
    import torch

    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(values)
    if isinstance(first, tuple):
        return tuple(_stack([v[i] for v in values]) for i in range(len(first)))
    return first


@dataclass
class TowerFeatureCache:
    """Per-image outputs of frozen vision towers (in memory), with hit and miss counts."""

    enabled: bool = True  # False: the tower is only pinned in eval mode and runs at every step
    hits: int = 0
    misses: int = 0
    _entries: dict[bytes, dict[str, Any]] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self._entries)

    def attach(self, model: Any, family: str, partly_frozen: bool = False) -> Callable[[], None] | None:
        """Cache ``model``'s vision tower if it is frozen (see module doc); returns a function that
        restores the tower's own forward, or None when nothing was attached. ``partly_frozen``: a
        pretrained tower of which only some submodules train (a stage's ``vision_trainable``) is not
        cached, but kept in eval mode all the same (its batch-norm statistics stay the pretrained ones)."""
        import torch

        tower = frozen_tower(model, family)
        if tower is None:
            return pin_tower_eval(model, family, partly_frozen)
        # The Trainer calls model.train() at every step: a frozen tower stays in eval mode (its batch-norm
        # statistics must not drift with the training batches, cached or not).
        unpin = _pin_eval(tower)
        original = tower.forward
        tower_key = _fingerprint(tower)

        def forward(pixel_values: Any, *args: Any, **kwargs: Any) -> Any:
            if args or any(isinstance(v, torch.Tensor) for v in kwargs.values()) or pixel_values.dim() < 2:
                return original(pixel_values, *args, **kwargs)
            options = repr(sorted(kwargs.items())).encode()
            keys = []
            for row in pixel_values:
                digest = hashlib.sha1(tower_key + options + str(tuple(row.shape)).encode())
                digest.update(row.detach().cpu().contiguous().numpy().tobytes())
                keys.append(digest.digest())
            first: dict[bytes, int] = {}  # each new image once, even when a batch holds it twice
            for i, key in enumerate(keys):
                if key not in self._entries:
                    first.setdefault(key, i)
            missing = list(first.values())
            self.hits += len(keys) - len(missing)
            self.misses += len(missing)
            if missing:
                # On the CPU the tower runs outside bf16 autocast, in its own dtype: autocast's bf16
                # convolutions are ~27x slower than fp32 on a CPU without AVX512-BF16 (benchmarks/bench_cpu_bf16.py).
                cpu = pixel_values.device.type == "cpu"
                dtype = next(tower.parameters()).dtype
                with torch.no_grad(), torch.autocast("cpu", enabled=False) if cpu else nullcontext():
                    out = original(pixel_values[missing].to(dtype), **kwargs)
                for j, i in enumerate(missing):
                    fields = {k: _slice(v, j) for k, v in out.items() if v is not None}
                    self._entries[keys[i]] = {_TYPE: type(out), **fields}
            rows = [self._entries[key] for key in keys]
            names = [k for k in rows[0] if k != _TYPE]
            return rows[0][_TYPE](**{k: _stack([row[k] for row in rows]) for k in names})

        if self.enabled:
            tower.forward = forward

        def detach() -> None:
            vars(tower).pop("forward", None)
            unpin()

        return detach
