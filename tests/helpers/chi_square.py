"""Chi-square goodness of fit of sampled outcomes against exact probabilities (the sampling tests).

    cells: every outcome expected >= MIN_EXPECTED times; the rest pooled into one cell
    statistic: sum (observed - expected)^2 / expected, with (cells - 1) degrees of freedom
"""

from collections import Counter

import torch

MIN_EXPECTED = 5.0


def chi_square_p_value(counts: Counter, expected: dict, n: int) -> float:
    """P(chi-square >= statistic) with the sparse cells pooled (see the module docstring)."""
    big = [k for k, p in expected.items() if p * n >= MIN_EXPECTED]
    cells = [(counts[k], expected[k] * n) for k in big]
    pooled = n - sum(e for _, e in cells)
    if pooled > 0:
        cells.append((n - sum(o for o, _ in cells), pooled))
    statistic = sum((o - e) ** 2 / e for o, e in cells)
    dof = len(cells) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))
