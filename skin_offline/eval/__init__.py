"""Evaluation: MM-Skin VQA metrics (vqa.py) and zero-shot classification metrics (classify_eval.py).

metrics.py needs the `eval` extra (nltk, rouge-score); nothing here is imported by the runtime.
"""
