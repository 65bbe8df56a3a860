"""Zero-shot reporting for datasets cut by ``emma data holdout`` (:mod:`emma.data.holdout`).

When the evaluated dataset carries a holdout recipe, ``emma eval`` adds a ``zero_shot`` block to
``results.json`` and the reports: the recipe, the role of the evaluated split (``zero_shot``,
``in_distribution``, ``training``), the leakage check recorded at build time, and the metrics of the
evaluated samples split by group, each sample placed by the recipe itself (:meth:`HoldoutRecipe.in_group`):
``zero_shot`` (the held-out group) and ``in_distribution`` (the rest). Where one run holds both groups
the ``gap`` (in-distribution minus zero-shot) gets an unpaired bootstrap CI
(:func:`emma.eval.stats.two_sample_bootstrap`).

``emma eval compare`` (:func:`compare_zero_shot`) uses the blocks of two runs: the same model run on
the zero-shot split and on the in-distribution split of one recipe shares no sample, so their gap is
an unpaired two-sample bootstrap; two runs on the same split (two models) stay the paired comparison
of :func:`emma.eval.runner.paired_deltas`, labelled with the split's role.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from emma.data.holdout import HoldoutRecipe, read_recipe, recorded
from emma.data.store import Dataset
from emma.eval.score_adapters import Adapter, Scored, metric_values
from emma.eval.stats import two_sample_bootstrap
from emma.eval.tasks import EvalItem

CI_LEVEL = 0.95


def _group(adapter: Adapter, scored: Sequence[Scored], n_resamples: int, seed: int) -> dict[str, Any] | None:
    if not scored:
        return None
    return {
        "n": len(scored),
        "metrics": adapter.metrics(scored),
        "ci95": adapter.cis(scored, n_resamples, seed),
    }


def gap(
    zero_shot: Mapping[str, Sequence[float]],
    in_distribution: Mapping[str, Sequence[float]],
    n_resamples: int,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Per metric: ``in_distribution - zero_shot`` means, unpaired bootstrap CI and p-value."""
    out: dict[str, dict[str, Any]] = {}
    for metric in sorted(set(zero_shot) & set(in_distribution)):
        a, b = zero_shot[metric], in_distribution[metric]
        if not len(a) or not len(b):
            continue
        c = two_sample_bootstrap(a, b, n_resamples=n_resamples, seed=seed, level=CI_LEVEL)
        out[metric] = {
            "n_zero_shot": c.n_a,
            "n_in_distribution": c.n_b,
            "zero_shot": c.stat_a,
            "in_distribution": c.stat_b,
            "delta": c.delta,
            "ci95": [c.ci_low, c.ci_high],
            "p_bootstrap": c.p_value,
        }
    return out


def zero_shot_block(
    dataset: Dataset,
    split: str,
    items: Sequence[EvalItem],
    scored: Sequence[Scored],
    adapter: Adapter,
    n_resamples: int,
    seed: int,
) -> dict[str, Any] | None:
    """The ``zero_shot`` block of a run on a held-out dataset; None for an ordinary dataset."""
    recipe = read_recipe(dataset)
    if recipe is None:
        return None
    inside = [recipe.in_group(it.sample) for it in items]
    zs = [s for s, m in zip(scored, inside) if m]
    ind = [s for s, m in zip(scored, inside) if not m]
    stored = recorded(dataset) or {}
    check = stored.get("check")
    return {
        "held_out": recipe.label,
        "role": recipe.role(split),
        "recipe": recipe.model_dump(),
        "leakage_check": check,
        "zero_shot": _group(adapter, zs, n_resamples, seed),
        "in_distribution": _group(adapter, ind, n_resamples, seed),
        "gap": gap(metric_values(zs), metric_values(ind), n_resamples, seed) if zs and ind else None,
        "method": "in_distribution - zero_shot; unpaired two-sample bootstrap (different samples)",
    }


def notes_for(block: Mapping[str, Any]) -> list[str]:
    """Notes for a run's ``notes`` list: what the headline metrics are under the recipe."""
    role = block["role"]
    notes = [f"zero-shot protocol: {block['held_out']} held out; the evaluated split is {role}"]
    if role == "training":
        notes.append("the evaluated split is a training split of the holdout recipe: not a zero-shot result")
    check = block.get("leakage_check")
    if check is None:
        notes.append("the dataset records no holdout leakage check: run `emma data check` on it")
    return notes


def compare_zero_shot(
    res_a: Mapping[str, Any],
    val_a: Mapping[str, Mapping[str, float]],
    res_b: Mapping[str, Any],
    val_b: Mapping[str, Mapping[str, float]],
    n_resamples: int,
    seed: int,
) -> dict[str, Any] | None:
    """Zero-shot view of two runs: None unless both carry a ``zero_shot`` block.

    Same recipe, no shared sample (one model on the zero-shot and on the in-distribution split): the gap
    B - A with an unpaired bootstrap. Otherwise the roles only (the caller's paired deltas apply).
    """
    za, zb = res_a.get("zero_shot"), res_b.get("zero_shot")
    if not za or not zb:
        return None
    same = (
        HoldoutRecipe.model_validate(za["recipe"]).label == HoldoutRecipe.model_validate(zb["recipe"]).label
    )
    out: dict[str, Any] = {
        "held_out": za["held_out"] if same else [za["held_out"], zb["held_out"]],
        "same_recipe": same,
        "role_a": za["role"],
        "role_b": zb["role"],
        "paired": bool(set(val_a) & set(val_b)),
        "gap": None,
    }
    if same and not out["paired"]:
        a = _values(val_a)
        b = _values(val_b)
        out["gap"] = {
            m: {
                "n_a": d["n_zero_shot"],
                "n_b": d["n_in_distribution"],
                "a": d["zero_shot"],
                "b": d["in_distribution"],
                "delta": d["delta"],
                "ci95": d["ci95"],
                "p_bootstrap": d["p_bootstrap"],
            }
            for m, d in gap(a, b, n_resamples, seed).items()
        }
        out["method"] = "B - A on different samples: unpaired two-sample bootstrap"
    return out


def _values(values: Mapping[str, Mapping[str, float]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for row in values.values():
        for metric, v in row.items():
            if np.isfinite(v):
                out.setdefault(metric, []).append(float(v))
    return out
