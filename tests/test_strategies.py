"""Sample-weighting baselines: their formulas on hand-made losses, degenerate cases, GroupDRO state."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf_dograph.strategies import GroupDRO, loss_reweighting_weights


def close(actual: torch.Tensor, expected: list[float], atol: float = 1e-12):
    torch.testing.assert_close(actual.to(torch.float64), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=atol)


# ---------------------------------------------------------------------------------------------------
# loss_reweighting_weights
# ---------------------------------------------------------------------------------------------------


def test_loss_reweighting_by_hand():
    # losses 1, 2, 3: mean 2, population std sqrt(2/3) (far above the floor 3e-4), so u = (−1, 0, 1)·sqrt(3/2).
    losses = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    std = math.sqrt(2.0 / 3.0)
    for temperature in (1.0, 0.5, 4.0):
        u = [-1.0 / std, 0.0, 1.0 / std]
        e = [math.exp(x / temperature) for x in u]
        expected = [x / sum(e) for x in e]
        alpha = loss_reweighting_weights(losses, temperature)
        close(alpha, expected)
        assert float(alpha.sum()) == pytest.approx(1.0, abs=1e-15)


def test_loss_reweighting_two_samples():
    # Two losses a < b: u = (−1, +1), α = (1, e²) / (1 + e²) at temperature 1.
    alpha = loss_reweighting_weights(torch.tensor([0.5, 4.5]), 1.0)
    close(alpha, [1 / (1 + math.exp(2)), math.exp(2) / (1 + math.exp(2))], atol=1e-7)
    assert alpha.dtype == torch.float32


def test_loss_reweighting_is_shift_and_scale_invariant():
    losses = torch.tensor([0.3, 2.0, 1.1, 5.0], dtype=torch.float64)
    a = loss_reweighting_weights(losses, 1.0)
    torch.testing.assert_close(loss_reweighting_weights(10 * losses + 7, 1.0), a, rtol=0, atol=1e-8)


@pytest.mark.parametrize("value", [0.1, 2.0, 1e6])
@pytest.mark.parametrize("batch", [1, 3, 7])
def test_loss_reweighting_equal_losses_are_uniform(value, batch):
    alpha = loss_reweighting_weights(torch.full((batch,), value, dtype=torch.float64), 0.3)
    assert torch.equal(alpha, torch.full((batch,), 1.0 / batch, dtype=torch.float64))


def test_loss_reweighting_rounding_differences_stay_near_uniform():
    # Losses equal but for float32 rounding (std ~5e-7): u is taken against the floor 1e-4 (1 + 4) = 5e-4,
    # not the std, so α stays within 0.2% of 1/B instead of being pushed to u = ±1.
    ulp = 4.76837158203125e-07  # float32 spacing at 4.0
    losses = torch.tensor([4.0, 4.0 + ulp, 4.0 - ulp, 4.0], dtype=torch.float32)
    alpha = loss_reweighting_weights(losses, 1.0)
    close(alpha, [0.25] * 4, atol=0.25 * 2e-3)
    # Just above the floor, real differences are still weighted: std 1e-3 > 5e-4 gives u = ±1.
    spread = loss_reweighting_weights(torch.tensor([4.001, 3.999], dtype=torch.float64), 1.0)
    close(spread, [math.exp(2) / (1 + math.exp(2)), 1 / (1 + math.exp(2))], atol=1e-9)


def test_loss_reweighting_high_temperature_tends_to_uniform():
    alpha = loss_reweighting_weights(torch.tensor([1.0, 5.0, 2.0]), 1e9)
    close(alpha, [1 / 3] * 3, atol=1e-8)


def test_loss_reweighting_carries_no_gradient():
    losses = torch.tensor([1.0, 3.0], requires_grad=True)
    alpha = loss_reweighting_weights(losses, 1.0)
    assert not alpha.requires_grad


def test_loss_reweighting_rejects_bad_temperature():
    with pytest.raises(ValueError):
        loss_reweighting_weights(torch.ones(3), 0.0)


# ---------------------------------------------------------------------------------------------------
# GroupDRO
# ---------------------------------------------------------------------------------------------------


def test_group_dro_first_update_by_hand():
    # Groups 0 (losses 1, 3: mean 2) and 1 (loss 4), η = 0.5, starting from q = (1/2, 1/2).
    dro = GroupDRO(step_size=0.5)
    alpha = dro.update(torch.tensor([1.0, 3.0, 4.0]), torch.tensor([0, 0, 1]))
    q0, q1 = 0.5 * math.exp(0.5 * 2.0), 0.5 * math.exp(0.5 * 4.0)
    q0, q1 = q0 / (q0 + q1), q1 / (q0 + q1)
    close(dro.weights, [q0, q1])
    # α_i = q_g / n_g, normalized over the groups present: (q0/2, q0/2, q1) / (q0 + q1) with q0 + q1 = 1.
    close(alpha, [q0 / 2, q0 / 2, q1], atol=1e-7)
    assert float(alpha.sum()) == pytest.approx(1.0, abs=1e-6)


def test_group_dro_absent_groups():
    # Three groups known; the batch holds groups 0 and 2 only: group 1 keeps its q, renormalization
    # over all groups shrinks it, and α renormalizes over the present groups.
    dro = GroupDRO(step_size=1.0, num_groups=3)
    alpha = dro.update(torch.tensor([2.0, 1.0], dtype=torch.float64), torch.tensor([0, 2]))
    raw = [math.exp(2.0) / 3, 1 / 3, math.exp(1.0) / 3]
    q = [x / sum(raw) for x in raw]
    close(dro.weights, q)
    close(alpha, [q[0] / (q[0] + q[2]), q[2] / (q[0] + q[2])])


def test_group_dro_grows_for_new_labels():
    dro = GroupDRO(step_size=1.0)
    dro.update(torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0, 1]))
    e = math.e
    before = [e / (e + 1), 1 / (e + 1)]
    close(dro.weights, before)
    # Label 2 appears: it starts at 1/3, the others share 2/3 as before; then the update.
    alpha = dro.update(torch.tensor([0.0], dtype=torch.float64), torch.tensor([2]))
    assert dro.num_groups == 3
    close(dro.weights, [2 / 3 * before[0], 2 / 3 * before[1], 1 / 3])  # exp(η·0) = 1: no change
    close(alpha, [1.0])


@pytest.mark.parametrize("batch", [1, 4, 9])
def test_group_dro_one_group_is_uniform(batch):
    dro = GroupDRO(step_size=0.1, num_groups=3)
    losses = torch.linspace(0.5, 3.0, batch, dtype=torch.float64)
    for _ in range(3):
        alpha = dro.update(losses, torch.full((batch,), 1))
        close(alpha, [1.0 / batch] * batch, atol=1e-15)


def test_group_dro_weights_favor_high_loss_groups_and_sum_to_one():
    dro = GroupDRO(step_size=0.2)
    losses = torch.tensor([0.5, 0.6, 2.0, 2.5, 1.0, 1.0, 1.0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    for _ in range(5):
        alpha = dro.update(losses, groups)
    q = dro.weights
    assert q[1] > q[2] > q[0]
    assert float(alpha.sum()) == pytest.approx(1.0, abs=1e-12)
    # Within a group every sample gets the same weight.
    assert alpha[0] == alpha[1] and alpha[4] == alpha[5] == alpha[6]


def test_group_dro_state_round_trip():
    torch.manual_seed(0)
    batches = [(torch.rand(6, dtype=torch.float64) * 3, torch.randint(0, 4, (6,))) for _ in range(4)]
    a = GroupDRO(step_size=0.3)
    for losses, groups in batches[:2]:
        a.update(losses, groups)
    state = json.loads(json.dumps(a.state_dict()))  # JSON-serializable
    assert isinstance(state["log_weights"], list) and all(isinstance(x, float) for x in state["log_weights"])
    b = GroupDRO(step_size=99.0)
    b.load_state_dict(state)
    assert b.step_size == 0.3
    for losses, groups in batches[2:]:
        assert torch.equal(a.update(losses, groups), b.update(losses, groups))
    assert torch.equal(a.weights, b.weights)


def test_group_dro_rejects_bad_input():
    dro = GroupDRO(step_size=0.1)
    with pytest.raises(ValueError):
        dro.update(torch.ones(3), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        dro.update(torch.ones(2), torch.tensor([0, -1]))
    with pytest.raises(ValueError):
        GroupDRO(step_size=0.0)
