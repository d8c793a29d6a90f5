"""The numbers that make MQL's adaptation what it is: logistic propensity, odds weights, ESS, lambda."""

import numpy as np
import pytest

from mql_ros.core.config import AdaptConfig
from mql_ros.core.errors import InputError
from mql_ros.core.propensity import (
    ESS_FALLBACK,
    LogisticModel,
    fit_logistic,
    normalized_ess,
    odds_weights,
    proximal_coefficient,
    weight_histogram,
)


@pytest.mark.parametrize("weights, expected", [
    ([1, 1, 1, 1], 1.0),
    ([1, 0, 0, 0], 0.25),
    ([2, 2, 2, 2], 1.0),
    ([3, 1, 0, 0], 16 / (4 * 10)),  # (3+1)^2 / (4 * (9+1)) = 0.4
    ([0.5, 1.5, 1.0], 9 / (3 * 3.5)),
])
def test_normalized_ess_matches_hand_computed_values(weights, expected):
    assert normalized_ess(np.array(weights, dtype=float)) == pytest.approx(expected, rel=1e-12)


def test_normalized_ess_falls_back_when_all_weights_are_zero_or_infinite():
    assert normalized_ess(np.zeros(5)) == ESS_FALLBACK
    assert normalized_ess(np.array([np.inf, 1.0])) == ESS_FALLBACK


@pytest.mark.parametrize("bad", [[], [1.0, np.nan], [1.0, -0.5]])
def test_normalized_ess_rejects_empty_nan_or_negative_weights(bad):
    with pytest.raises(InputError):
        normalized_ess(np.array(bad, dtype=float))


def test_logistic_logit_recovers_gaussian_log_density_ratio():
    # Class 1 ~ N(1, 1), class 0 ~ N(-0.5, 1), equal counts: the true logit is linear,
    # log N(x; 1, 1) / N(x; -0.5, 1) = ((x + 0.5)^2 - (x - 1)^2) / 2 = 1.5 x - 0.375.
    rng = np.random.default_rng(0)
    n = 20000
    X = np.concatenate([rng.normal(1.0, 1.0, n), rng.normal(-0.5, 1.0, n)])[:, None]
    y = np.concatenate([np.ones(n), np.zeros(n)])
    model = fit_logistic(X, y, C=100.0)
    grid = np.linspace(-2, 2.5, 19)[:, None]
    true = 1.5 * grid[:, 0] - 0.375
    np.testing.assert_allclose(model.logit(grid), true, atol=0.08)


def test_logistic_recovers_two_dimensional_ratio_with_unequal_class_sizes():
    # With n1 / n0 = 1 / 3 the fitted logit also carries the prior term log(1/3).
    rng = np.random.default_rng(1)
    mu1, mu0 = np.array([0.5, -1.0]), np.array([-0.5, 0.0])
    X1 = rng.normal(mu1, 1.0, size=(8000, 2))
    X0 = rng.normal(mu0, 1.0, size=(24000, 2))
    model = fit_logistic(np.vstack([X1, X0]), np.r_[np.ones(8000), np.zeros(24000)], C=100.0)
    grid = rng.uniform(-1.5, 1.5, size=(50, 2))
    true = grid @ (mu1 - mu0) - 0.5 * (mu1 @ mu1 - mu0 @ mu0) + np.log(1 / 3)
    np.testing.assert_allclose(model.logit(grid), true, atol=0.1)


def test_logistic_strong_regularization_shrinks_coefficients_toward_zero():
    rng = np.random.default_rng(2)
    X = np.concatenate([rng.normal(1.0, 1.0, 500), rng.normal(-1.0, 1.0, 500)])[:, None]
    y = np.r_[np.ones(500), np.zeros(500)]
    weak, strong = fit_logistic(X, y, C=10.0), fit_logistic(X, y, C=1e-4)
    assert abs(strong.coef[0]) < 0.1 * abs(weak.coef[0])


def test_logistic_gradient_is_zero_at_the_returned_optimum():
    # Optimality of 0.5|w|^2 + C sum logloss on standardized features, checked independently.
    rng = np.random.default_rng(3)
    X = rng.normal(size=(300, 3)) * [1.0, 10.0, 0.1] + [0.0, 5.0, -2.0]
    y = (X[:, 0] + 0.1 * X[:, 1] + rng.normal(size=300) > 0.5).astype(float)
    C = 0.5
    m = fit_logistic(X, y, C=C)
    Z = (X - m.mean) / m.scale
    p = 1 / (1 + np.exp(-(Z @ m.coef + m.intercept)))
    np.testing.assert_allclose(m.coef + C * Z.T @ (p - y), 0.0, atol=1e-6)
    assert abs(np.sum(p - y)) < 1e-6


def test_logistic_handles_separable_data_and_constant_features():
    X = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0], [3.0, 1.0]])
    m = fit_logistic(X, np.array([0, 0, 1, 1]), C=0.5)
    assert np.all(np.isfinite(m.coef)) and np.isfinite(m.intercept)
    assert m.logit(np.array([[3.0, 1.0]]))[0] > 0 > m.logit(np.array([[0.0, 1.0]]))[0]


@pytest.mark.parametrize("X, y, message", [
    (np.ones((4, 2)), np.array([0, 1, 0]), "labels"),
    (np.ones((4, 2)), np.array([1, 1, 1, 1]), "both classes"),
    (np.ones((4, 2)), np.array([0, 1, 2, 1]), "0 or 1"),
    (np.array([[0.0, np.nan], [1.0, 1.0]]), np.array([0, 1]), "NaN"),
    (np.ones(4), np.array([0, 1, 0, 1]), "2-D"),
])
def test_fit_logistic_rejects_bad_input_with_a_clear_message(X, y, message):
    with pytest.raises(InputError, match=message):
        fit_logistic(X, y)


def test_odds_weights_are_exp_of_minus_archive_logit_clamped_and_zeroed():
    model = LogisticModel(coef=np.array([1.0]), intercept=0.0)  # logit of "archive" = x
    X = np.array([[-5.0], [-1.0], [0.0], [1.0], [2.0], [3.0]])
    w = odds_weights(model, X, beta_clip=1.2, min_weight=0.1)
    expected = np.exp(-np.maximum(X[:, 0], -1.2))
    expected[expected < 0.1] = 0.0
    np.testing.assert_allclose(w, expected)
    assert w[0] == pytest.approx(np.exp(1.2))  # clamped: beta <= e^beta_clip
    assert w[-1] == 0.0  # e^-3 ~ 0.05 < 0.1


def test_odds_weights_reject_wrong_feature_count():
    model = LogisticModel(coef=np.array([1.0, 2.0]), intercept=0.0)
    with pytest.raises(InputError, match="2 features"):
        odds_weights(model, np.zeros((3, 3)), beta_clip=1.0, min_weight=0.1)


def test_proximal_coefficient_modes():
    assert proximal_coefficient(0.3, AdaptConfig(proximal="ess")) == pytest.approx(0.7)
    assert proximal_coefficient(1.0, AdaptConfig(proximal="ess")) == 0.0
    assert proximal_coefficient(0.3, AdaptConfig(proximal="fixed", fixed_lambda=0.25)) == 0.25
    assert proximal_coefficient(0.3, AdaptConfig(proximal="off")) == 0.0
    with pytest.raises(InputError):
        proximal_coefficient(float("nan"), AdaptConfig(proximal="ess"))


def test_low_ess_gives_a_stronger_pull_to_the_meta_weights():
    cfg = AdaptConfig(proximal="ess")
    peaked = normalized_ess(np.array([5.0, 0.1, 0.1, 0.1, 0.1]))
    flat = normalized_ess(np.array([1.0, 1.1, 0.9, 1.0, 1.0]))
    assert proximal_coefficient(peaked, cfg) > proximal_coefficient(flat, cfg)


def test_weight_histogram_counts_every_weight():
    edges, counts = weight_histogram(np.array([0.0, 0.0, 0.5, 1.0, 2.0]), bins=4)
    assert len(edges) == 5 and edges[0] == 0.0 and edges[-1] == 2.0
    assert sum(counts) == 5 and counts[0] == 2
