"""Export time: checkpoint -> ONNX bundle (may import torch, transformers, sentencepiece)."""
