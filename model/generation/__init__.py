"""The generation engine: prefill (with the memory slot), decoding steps, beams over the title trie,
speculative steps, the stop rule and the KV caches, as free functions around the cut model
(``model/llm.py``). The service's scheduler and the evaluator drive the same functions.

    p = begin(lm, prompts, tags)            # prefill.py
    z = advance(lm, p)                      # z_t [B, H] (after any chunks: None until the last)
    batch = complete(lm, p, vectors, use)   # the caller's memory pick fills the slots
    finished = step(lm, batch)              # decode.py: (tag, tokens) of the rows that left
"""
from model.generation.batch import DecodeBatch
from model.generation.decode import decode, generate, step
from model.generation.prefill import Prefill, advance, begin, complete, run
from model.generation.stop import StopAfterFirstLine, stop_rule

__all__ = ["DecodeBatch", "Prefill", "StopAfterFirstLine", "advance", "begin", "complete", "decode", "generate",
           "run", "step", "stop_rule"]
