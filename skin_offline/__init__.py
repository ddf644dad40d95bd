"""skin-offline: run the SkinVL dermatology VLM offline (ONNX bundle + NumPy/onnxruntime runtime)."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so `import skin_offline` (and `skin-offline --help`) stays cheap.
    if name == "SkinVL":
        from .runtime.pipeline import SkinVL

        return SkinVL
    raise AttributeError(name)
