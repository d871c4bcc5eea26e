"""Hypothesis settings shared by the property-based (fuzz) tests, and edge values they draw from.

CI runs a small, fixed set of examples (derandomized, no example database written); setting
SPECSERVE_FUZZ_EXAMPLES=N runs N random examples instead, to search wider.
"""

import os

from hypothesis import HealthCheck, settings

CI_EXAMPLES = 20


def fuzz_settings() -> settings:
    chosen = os.environ.get("SPECSERVE_FUZZ_EXAMPLES")
    return settings(max_examples=int(chosen) if chosen else CI_EXAMPLES, derandomize=chosen is None,
                    database=None, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# Sampling values at and beyond the edges: float32's smallest and largest, denormals, exact 0/1.
TEMPERATURES = (0.0, 1.4e-45, 1e-40, 1e-6, 1e-5, 0.7, 1.0, 1.3, 100.0, 3.4e38)
TOP_P = (1.0, 1e-9, 0.1, 0.5, 0.999)
TOP_K = (0, 1, 2, 50, 96, 97, 1000)
MAX_DRAFT = (0, 1, 2, 79, 80, 1000)
STOPS = ((), ("w5",), ("w9 w9", "w3"), ("w1",))
