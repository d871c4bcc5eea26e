"""Lossless speculative decoding: drafters propose draft trees, the target verifies them."""
