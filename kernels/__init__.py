"""Pure tensor functions: attention with log-sum-exp, RoPE, norms. Imports torch only."""
