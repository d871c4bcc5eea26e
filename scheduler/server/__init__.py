"""The gRPC front door: server lifecycle, servicer, request validation, auth, metrics, routing."""
