"""Propensity estimation for MQL adaptation: which archived transitions look like the new task?

A logistic model separates new-task transitions from archived ones; its odds turn into importance weights
for the archive, and the normalized effective sample size (ESS) of those weights says how much of the
archive is usable, which sets the proximal coefficient under `proximal: ess` (../shared/MQL.md steps 3, 4
and 7; the default is the authors' fixed lambda, the ESS is reported either way). The features
are few (a context vector, optionally with the observation), so an exact Newton solver converges to the
optimum in a handful of steps; no scikit-learn needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mql_ros.core.config import AdaptConfig
from mql_ros.core.errors import InputError

ESS_FALLBACK = 0.1  # MQL.md step 7: used when the ESS is not finite or about 0


@dataclass
class LogisticModel:
    """logit(x) = coef . (x - mean) / scale + intercept, i.e. log P(y=1|x) / P(y=0|x).

    The standardization is part of the model so callers pass raw features at fit and at use.
    """

    coef: np.ndarray
    intercept: float
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None

    def logit(self, X: np.ndarray) -> np.ndarray:
        X = _check_features(X, "logit")
        if X.shape[1] != self.coef.shape[0]:
            raise InputError(f"logit: model has {self.coef.shape[0]} features, got {X.shape[1]}")
        if self.mean is not None:
            X = (X - self.mean) / self.scale
        return X @ self.coef + self.intercept


def _check_features(X: np.ndarray, what: str) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise InputError(f"{what}: features must be a 2-D array (n, d), got shape {X.shape}")
    if not np.all(np.isfinite(X)):
        raise InputError(f"{what}: features contain NaN or inf")
    return X


def _log1pexp(z: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, z)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-_log1pexp(-z))


def fit_logistic(X: np.ndarray, y: np.ndarray, C: float = 0.5, max_iter: int = 2000,
                 tol: float = 1e-10) -> LogisticModel:
    """L2-regularized logistic regression: minimize 0.5 |w|^2 + C * sum_i logloss(y_i, x_i . w + b).

    The objective is scikit-learn's (intercept not penalized), here on standardized features so that C
    means the same thing whatever the features' units. Damped Newton steps with a backtracking line
    search: the problem is strictly convex in w and, with both classes present, in b, so this converges
    to the unique optimum; `max_iter` bounds the Newton steps.
    """
    X = _check_features(X, "fit_logistic")
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if y.shape[0] != X.shape[0]:
        raise InputError(f"fit_logistic: {X.shape[0]} feature rows but {y.shape[0]} labels")
    if not np.all((y == 0) | (y == 1)):
        raise InputError("fit_logistic: labels must be 0 or 1")
    if y.min() == y.max():
        raise InputError("fit_logistic: need examples of both classes")
    if not (np.isfinite(C) and C > 0):
        raise InputError(f"fit_logistic: C must be a positive finite number, got {C}")
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale[scale < 1e-12] = 1.0
    Z = np.hstack([(X - mean) / scale, np.ones((X.shape[0], 1))])  # last column: the intercept
    d = X.shape[1]
    penalty = np.ones(d + 1)
    penalty[d] = 0.0

    def objective(theta: np.ndarray) -> float:
        z = Z @ theta
        return 0.5 * float(np.sum(penalty * theta**2)) + C * float(np.sum(_log1pexp(z) - y * z))

    theta = np.zeros(d + 1)
    f = objective(theta)
    for _ in range(max_iter):
        p = _sigmoid(Z @ theta)
        grad = penalty * theta + C * (Z.T @ (p - y))
        if np.max(np.abs(grad)) <= tol * max(1.0, C * X.shape[0]):
            break
        hess = np.diag(penalty) + C * (Z.T * (p * (1.0 - p))) @ Z
        step = np.linalg.solve(hess + 1e-12 * np.eye(d + 1), grad)
        t = 1.0
        while True:
            candidate = theta - t * step
            f_new = objective(candidate)
            if f_new <= f - 1e-4 * t * float(grad @ step) or t < 1e-10:
                break
            t *= 0.5
        if f_new >= f:  # no descent left at machine precision: this is the optimum
            break
        theta, f = candidate, f_new
    return LogisticModel(coef=theta[:d].copy(), intercept=float(theta[d]), mean=mean, scale=scale)


def odds_weights(model: LogisticModel, X_archive: np.ndarray, beta_clip: float,
                 min_weight: float) -> np.ndarray:
    """beta = exp(-f), f the model's logit of the *archive* class (the model must be fit with y=1 for
    archive rows): the odds P(new|x) / P(archive|x). f is clamped below at -beta_clip so no single
    transition can dominate (beta <= e^beta_clip), and weights under min_weight become exactly 0 so
    transitions unlike the new task do not move the networks at all.
    """
    f = np.maximum(model.logit(X_archive), -float(beta_clip))
    beta = np.exp(-f)
    beta[beta < min_weight] = 0.0
    return beta


def normalized_ess(weights: np.ndarray) -> float:
    """(sum b)^2 / (n sum b^2) in (0, 1]: 1 when all weights are equal, 1/n when one weight carries all.

    Falls back to ESS_FALLBACK (MQL.md step 7) when the ratio is not finite or about 0, e.g. when every
    weight was zeroed; an empty, negative or NaN weight vector is an input error, not a fallback case.
    """
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size == 0:
        raise InputError("normalized_ess: no weights")
    if np.any(np.isnan(w)) or np.any(w < 0):
        raise InputError("normalized_ess: weights must be non-negative numbers (got NaN or a negative)")
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        ess = float(w.sum() ** 2 / (w.size * np.sum(w**2)))
    if not np.isfinite(ess) or ess < 1e-8:
        return ESS_FALLBACK
    return ess


def proximal_coefficient(ess: float, cfg: AdaptConfig) -> float:
    """The weight of the pull toward the meta-trained parameters: "ess" -> 1 - ESS (little usable archive
    data -> stay close), "fixed" -> cfg.fixed_lambda (the released code's setting), "off" -> 0."""
    if cfg.proximal == "off":
        return 0.0
    if cfg.proximal == "fixed":
        return float(cfg.fixed_lambda)
    if not (np.isfinite(ess) and 0.0 < ess <= 1.0 + 1e-9):
        raise InputError(f"proximal_coefficient: ESS must be in (0, 1], got {ess}")
    return float(max(0.0, 1.0 - ess))


def weight_histogram(weights: np.ndarray, bins: int = 10) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """(bin edges, counts) of the weights from 0 to their maximum, for adaptation reports and logs."""
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size == 0:
        return (), ()
    top = float(w.max()) if w.max() > 0 else 1.0
    counts, edges = np.histogram(w, bins=bins, range=(0.0, top))
    return tuple(float(e) for e in edges), tuple(int(c) for c in counts)
