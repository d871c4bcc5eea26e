"""Request lifecycle, CLI and (later) the gRPC servicer. Never touches tensors."""
