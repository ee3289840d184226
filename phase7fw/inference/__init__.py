"""Inference: cached and static (CUDA-graph) decoding, sampling, the chat session and the
lm-evaluation-harness adapter (docs/generation.md, docs/architecture.md).

Nothing here imports the core: everything works on a model (and, for the harness, an object
with the Engine's ``model``/``tokenizer``/``device`` attributes) it is handed.
"""
