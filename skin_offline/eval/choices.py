"""The evaluation commands' choices as enums (imported by the CLI at start-up, so kept free of heavy imports)."""

from __future__ import annotations

from enum import Enum


class Protocol(str, Enum):
    PAPER = "paper"  # VQA_test.py: sampling inside 5 beams, temperature 0.2, top-p 0.9, min 20 / max 256 new tokens
    GREEDY = "greedy"  # deterministic, for comparing precisions


class ClassifyMethod(str, Enum):
    LIKELIHOOD = "likelihood"  # rank every label by its log-probability as the answer (one shared prefill)
    GENERATE = "generate"  # the paper's way: answer the question, take the first label named
