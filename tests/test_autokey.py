"""Automatic key-step selection: exact DP against brute force, budget, determinism, bad input."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

import distfd
from distfd import autokey
from tests import tiny


def brute_force(drift: torch.Tensor, budget: int, weights: torch.Tensor | None = None) -> float:
    n = drift.shape[0]
    if weights is not None:
        drift = drift * weights[None, :]
    best = float("inf")
    for rest in itertools.combinations(range(1, n), budget - 1):
        keys = (0, *rest)
        cost = sum(float(drift[max(k for k in keys if k <= j), j]) for j in range(n))
        best = min(best, cost)
    return best


def random_drift(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.triu(torch.rand(n, n, generator=g, dtype=torch.float64), diagonal=1)


@pytest.mark.parametrize("n,budget,seed", [(6, 1, 0), (7, 3, 1), (8, 4, 2), (9, 9, 3), (10, 5, 4)])
def test_dp_matches_brute_force(n: int, budget: int, seed: int) -> None:
    drift = random_drift(n, seed)
    keys, cost = autokey.select_key_steps(drift, budget)
    assert len(keys) == budget and keys[0] == 0 and list(keys) == sorted(set(keys))
    assert cost == pytest.approx(brute_force(drift, budget))
    assert cost == pytest.approx(sum(float(drift[max(k for k in keys if k <= j), j]) for j in range(n)))


def test_dp_with_weights_matches_brute_force() -> None:
    drift = random_drift(8, 5)
    weights = torch.linspace(3.0, 0.1, 8, dtype=torch.float64)
    keys, cost = autokey.select_key_steps(drift, 3, weights)
    assert cost == pytest.approx(brute_force(drift, 3, weights))
    with pytest.raises(ValueError, match="weights"):
        autokey.select_key_steps(drift, 3, -weights)


def test_sigma_weights_follow_the_noise_level() -> None:
    sched = tiny.scheduler("ddim")
    sched.set_timesteps(10)
    w = autokey.sigma_weights(sched, sched.timesteps)
    assert w.shape == (10,) and w.mean() == pytest.approx(1.0)
    assert w.argmax() == 0 and w[0] > 5 * w[5]  # early (noisy) steps move the sample most


def test_dp_follows_the_drift() -> None:
    # Features that change fast early and slowly later: the key steps gather at the start.
    position = torch.tensor([0, 4, 7, 9, 10, 10.5, 10.8, 11, 11.1, 11.2, 11.25, 11.3], dtype=torch.float64)
    drift = torch.triu((position[None, :] - position[:, None]).abs(), diagonal=1)
    keys, _ = autokey.select_key_steps(drift, 4)
    assert keys == (0, 1, 3, 6)  # uniform would be (0, 3, 6, 9)
    assert brute_force(drift, 4) == pytest.approx(autokey.select_key_steps(drift, 4)[1])


def test_budget_from_speedup_formula() -> None:
    assert autokey.budget_for_speedup(50, 0.4, 1.0) == 50
    k = autokey.budget_for_speedup(50, 0.4, 1.3)
    assert autokey.speedup_for_budget(50, 0.4, k) >= 1.3 > autokey.speedup_for_budget(50, 0.4, k + 1)
    with pytest.raises(ValueError, match="out of reach"):
        autokey.budget_for_speedup(50, 0.4, 3.0)
    with pytest.raises(ValueError, match=">= 1"):
        autokey.budget_for_speedup(50, 0.4, 0.5)


@pytest.mark.parametrize("budget", [0, 7, True, 2.5])
def test_select_rejects_bad_budget(budget) -> None:
    with pytest.raises(ValueError, match="budget"):
        autokey.select_key_steps(random_drift(6, 0), budget)


def test_calibrate_tiny_pipeline(tmp_path) -> None:
    pipe = tiny.sd()
    kw = dict(prompts=["a red circle"], seed=3, guidance_scale=5.0, height=32, width=32)
    first = distfd.calibrate(pipe, 8, budget=3, save_to=tmp_path / "auto.json", **kw)
    again = distfd.calibrate(pipe, 8, budget=3, **kw)
    assert first.key_steps == again.key_steps and len(first.key_steps) == 3 and first.key_steps[0] == 0
    torch.testing.assert_close(first.drift, again.drift)
    assert 0.0 < first.encoder_fraction < 1.0
    upper = torch.triu_indices(8, 8, offset=1)
    assert (first.drift.tril() == 0).all() and (first.drift[upper[0], upper[1]] > 0).all()
    saved = json.loads((tmp_path / "auto.json").read_text())
    assert saved["num_steps"] == 8 and tuple(saved["key_steps"]) == first.key_steps
    # The preset file drives the engine as is.
    handle = distfd.apply(pipe, distfd.FasterDiffusionConfig(key_steps=str(tmp_path / "auto.json")))
    try:
        tiny.run(pipe, steps=8)
        assert handle.stats()["encoder_passes"] == 3
    finally:
        handle.remove()
    assert first.weights is None
    by_speed = distfd.calibrate(pipe, 8, target_speedup=1.1, weighting="sigma", **kw)
    assert by_speed.predicted_speedup >= 1.1 and by_speed.weights is not None
    torch.testing.assert_close(by_speed.drift, first.drift)


def test_calibrate_bad_input() -> None:
    pipe = tiny.sd()
    with pytest.raises(ValueError, match="exactly one"):
        distfd.calibrate(pipe, 8)
    with pytest.raises(ValueError, match="exactly one"):
        distfd.calibrate(pipe, 8, budget=2, target_speedup=1.2)
    with pytest.raises(ValueError, match="exceeds"):
        distfd.calibrate(pipe, 8, budget=9)
    with pytest.raises(ValueError, match="prompts"):
        distfd.calibrate(pipe, 8, budget=2, prompts=[])
    with pytest.raises(ValueError, match="weighting"):
        distfd.calibrate(pipe, 8, budget=2, weighting="sqrt")
    handle = distfd.apply(pipe, distfd.FasterDiffusionConfig(key_steps=[0]))
    try:
        with pytest.raises(RuntimeError, match="vanilla"):
            distfd.calibrate(pipe, 8, budget=2)
    finally:
        handle.remove()


def test_auto_key_steps_spec_points_to_calibrate() -> None:
    with pytest.raises(ValueError, match="calibrate"):
        distfd.FasterDiffusionConfig(key_steps="auto")
