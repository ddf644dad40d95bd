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


class QuantMethod(str, Enum):
    """How int4/int8 decoder weights are rounded (`export/quantize --quant-method`; export/calibrate.py)."""

    GPTQ = "gptq"  # calibrated: error compensation over each layer's Hessian (the int4 default)
    RTN = "rtn"  # round to nearest on absmax block scales (onnxruntime's own packing; no calibration)
