"""Runtime: runs an exported bundle with NumPy, onnxruntime and tokenizers only."""
