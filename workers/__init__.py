"""The engine and the Ray actors that wrap it: model runner, paged KV cache, sampler."""
