"""The front doors and the orchestration; never touches tensors. `server/`: the gRPC server
(validation, auth, metrics, routing). `ray/`: the Ray worker pools and the request driver.
`cli/`: the `specserve` command. `client.py`: the Python client; `prompts.py`: prompt types."""
