"""Everything that touches the model: the in-process engine (`engine/`), the model (`model/`),
speculation (`spec/`) and the thin Ray actor wrappers (`actors/`, the only place that imports
ray at module level). Knows nothing of gRPC or HTTP."""
