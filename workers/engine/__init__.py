"""The in-process engine: LLMEngine (one step = plan, forward, sample/verify), the step planner
(the batch scheduler), sequences, the paged KV cache, the sampler, the detokenizer and the
EngineLoop thread that drives an engine for concurrent callers."""
