"""automr.model: the pure ML side (data, LLM split, memory, retriever, grounding, training, evaluation).

Nothing in this package knows about HTTP or Redis.
"""
