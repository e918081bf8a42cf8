"""Enumerated names shared by the library and its front ends, in a module that imports nothing.

The CLI builds its ``choices=`` from these without importing torch; the heavy modules check their
arguments against the same tuples (tests/test_package.py asserts that they agree).
"""

from __future__ import annotations

# intervene.Steer: how a vector acts on a block output ("transform" takes a Python callable, so the
# command line offers only the others; "transport" needs a Linear-AcT vector and a strength in [0, 1])
OPERATORS = ("add", "ablate", "clamp", "rotate", "transport")
SCOPES = ("all", "prompt", "generated")
# activations.collect / extract: which tokens of a text are read
POSITIONS = ("last", "mean", "max", "response_mean")
# probes: how a probe pools the prompt tokens
POOLINGS = ("last", "mean", "max")
# extract.METHODS: contrast methods, (pos_acts, neg_acts) -> direction
METHODS = ("mean_diff", "pca", "actadd", "probe_weight")
# model.load_model(dtype=...)
DTYPES = ("auto", "float32", "bfloat16", "float16")
# compose: several vectors at once
COMPOSE_MODES = ("separate", "sum")
# export: file formats a vector can be written to
EXPORT_FORMATS = ("gguf", "safetensors")
