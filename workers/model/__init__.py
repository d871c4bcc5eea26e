"""The model: Llama-family config, weights from a Hugging Face folder or GGUF file, our own
forward (paged, tree-masked) and its sequence-parallel prefill."""
