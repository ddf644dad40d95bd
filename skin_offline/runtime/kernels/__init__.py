"""Kernel choice: which decoder graph (onnxruntime kernel family) runs a call (policy.py)."""
