"""Pareto frontiers over (interactivity, metric) and monotone interpolation along them.

A point is on the frontier when no other point is at least as interactive (tok/s/user) and
at least as good in the metric (tokens per joule, throughput), and better in one of the two.
Along the frontier, sorted by interactivity, the metric falls strictly, so a monotone cubic
(PCHIP, Fritsch and Carlson, 1980, as in scipy.interpolate.PchipInterpolator) gives values
between measured points without inventing bumps or dips. Nothing is extrapolated: a query
outside the measured interactivity range is refused with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def pareto_frontier(xs: Sequence[float], ys: Sequence[float], maximize_y: bool = True) -> list[int]:
    """Indices of the points on the frontier that maximizes x and maximizes (or minimizes) y,
    in order of increasing x. Exact duplicates keep their first index; non-finite values
    never enter."""
    sign = 1.0 if maximize_y else -1.0
    order = [i for i in range(len(xs)) if _finite(xs[i]) and _finite(ys[i])]
    # Most interactive first; among equal x the best y first, then the earliest index.
    order.sort(key=lambda i: (-xs[i], -sign * ys[i], i))
    kept: list[int] = []
    best = -math.inf
    for i in order:
        if sign * ys[i] > best:
            kept.append(i)
            best = sign * ys[i]
    return kept[::-1]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def pchip_slopes(xs: Sequence[float], ys: Sequence[float]) -> list[float]:
    """Derivatives at the knots of the shape-preserving piecewise cubic (PCHIP).

    Interior knots take the weighted harmonic mean of the neighbouring secant slopes (zero
    where they differ in sign); end knots take the one-sided three-point estimate, clamped so
    that the curve stays monotone. ``xs`` must increase strictly.
    """
    n = len(xs)
    if n < 2:
        return [0.0] * n
    h = [xs[k + 1] - xs[k] for k in range(n - 1)]
    delta = [(ys[k + 1] - ys[k]) / h[k] for k in range(n - 1)]
    if n == 2:
        return [delta[0], delta[0]]
    d = [0.0] * n
    for k in range(1, n - 1):
        a, b = delta[k - 1], delta[k]
        if a == 0 or b == 0 or (a > 0) != (b > 0):
            continue
        w1, w2 = 2 * h[k] + h[k - 1], h[k] + 2 * h[k - 1]
        d[k] = (w1 + w2) / (w1 / a + w2 / b)
    d[0] = _end_slope(h[0], h[1], delta[0], delta[1])
    d[-1] = _end_slope(h[-1], h[-2], delta[-1], delta[-2])
    return d


def _end_slope(h0: float, h1: float, d0: float, d1: float) -> float:
    d = ((2 * h0 + h1) * d0 - h0 * d1) / (h0 + h1)
    if d == 0 or d0 == 0 or (d > 0) != (d0 > 0):
        return 0.0
    if (d0 > 0) != (d1 > 0) and abs(d) > abs(3 * d0):
        return 3 * d0
    return d


@dataclass(frozen=True)
class Query:
    """The answer to "what is the metric at this interactivity": ``value`` or, when it
    cannot be had from measured points, None and ``reason``; ``between`` names the two
    frontier knots (indices into the frontier) that bracket the query."""

    value: float | None
    reason: str | None = None
    between: tuple[int, int] | None = None


class Frontier:
    """A monotone interpolant through frontier points (x increasing strictly)."""

    def __init__(self, xs: Sequence[float], ys: Sequence[float]) -> None:
        if len(xs) != len(ys) or not xs:
            raise ValueError("a frontier needs at least one (x, y) pair")
        if any(b <= a for a, b in zip(xs, xs[1:])):
            raise ValueError("frontier x must increase strictly")
        self.xs = [float(x) for x in xs]
        self.ys = [float(y) for y in ys]
        self.slopes = pchip_slopes(self.xs, self.ys)

    @classmethod
    def of_points(
        cls, xs: Sequence[float], ys: Sequence[float], maximize_y: bool = True
    ) -> tuple[Frontier, list[int]] | None:
        """The frontier of the given points and the indices of the points on it (None when
        no point has both values)."""
        idx = pareto_frontier(xs, ys, maximize_y)
        if not idx:
            return None
        return cls([xs[i] for i in idx], [ys[i] for i in idx]), idx

    def at(self, x: float, unit: str = "tok/s/user") -> Query:
        """The interpolated value at ``x``, or a refusal outside the measured range."""
        lo, hi = self.xs[0], self.xs[-1]
        if not x >= lo or not x <= hi:
            return Query(
                None,
                f"{x:g} {unit} is outside the measured frontier range "
                f"{lo:.4g}..{hi:.4g} {unit}; not extrapolated",
            )
        if len(self.xs) == 1:
            return Query(self.ys[0], None, (0, 0))
        k = max(i for i in range(len(self.xs) - 1) if self.xs[i] <= x)
        return Query(self._hermite(k, x), None, (k, k + 1))

    def _hermite(self, k: int, x: float) -> float:
        h = self.xs[k + 1] - self.xs[k]
        t = (x - self.xs[k]) / h
        h00 = (1 + 2 * t) * (1 - t) ** 2
        h10 = t * (1 - t) ** 2
        h01 = t * t * (3 - 2 * t)
        h11 = t * t * (t - 1)
        return (
            h00 * self.ys[k]
            + h10 * h * self.slopes[k]
            + h01 * self.ys[k + 1]
            + h11 * h * self.slopes[k + 1]
        )

    def curve(self, points_per_segment: int = 24) -> tuple[list[float], list[float]]:
        """Dense (x, y) samples of the interpolant between the first and last knot, for
        drawing; each knot is included exactly."""
        xs, ys = [self.xs[0]], [self.ys[0]]
        for k in range(len(self.xs) - 1):
            a, b = self.xs[k], self.xs[k + 1]
            for j in range(1, points_per_segment + 1):
                x = b if j == points_per_segment else a + (b - a) * j / points_per_segment
                xs.append(x)
                ys.append(self.ys[k + 1] if j == points_per_segment else self._hermite(k, x))
        return xs, ys
