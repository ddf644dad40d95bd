"""Export-side choices as enums, importable without torch/onnx (the CLI types its options with them at start-up)."""

from __future__ import annotations

from enum import Enum


class DemoLayout(str, Enum):
    """Checkpoint layouts the random-weight factory writes (export/factory.py)."""

    LLAVA = "llava"  # original LLaVA / LLaVA-Med (LlavaMistralForCausalLM), what SkinVL ships
    HF = "hf"  # transformers LlavaForConditionalGeneration, current key nesting
    HF_OLD = "hf-old"  # the same, transformers < 4.52 nesting


class DemoPreset(str, Enum):
    TINY = "tiny"  # a few MB: tests and `make demo`
    BENCH = "bench"  # exact SkinVL widths, 4 decoder layers: benchmarks
