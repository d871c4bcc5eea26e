"""Ray actor wrappers around the engine: verify, prefill, draft and prefill-group workers and the
typed messages they exchange. Plain classes wrapped by `ray.remote` at creation, so each also
runs in unit tests without a cluster."""
