"""Runtime: runs an exported bundle with NumPy, onnxruntime and tokenizers only (no torch, no network).

The request path, in order (each module's first lines say its one job):

1. `pipeline.py`   the facade: `SkinVL.load`, then `prepare` / `prepare_beam` / `prepare_scoring` a request
2. `image.py`      image bytes -> 8-bit RGB (+ the loader's notices as data; DICOM via `dicom.py`,
                   size limit in `pixel_limit.py`) -> CLIP pixels [1,3,S,S]
3. `prompt.py`     question + history -> LLaVA's prompt ids and its image span (`Prompt`), checked by `tokenizer.py`
4. `request.py`    everything a request is refused for is checked here, before it queues: a prepared `Request`
5. `engine.py`     the one scheduler every mode runs through: queue, admission by rows, chunked prefill,
                   one decoder run per step for every row of every request
   `vision.py`     (the engine's second thread) pixels -> image features, memoised by content
   `prompt_cache.py` the KV of recent prompts, found again by their longest shared prefix
   `slots.py`      the engine's KV rows over a decoder; `kv.py` the one in-place KV binding, caches, snapshots
   `decoder.py`    embeddings + KV -> logits (onnxruntime sessions from `sessions.py`, graphs picked by
                   `kernels/policy.py`, loaded by `bundle.py`; `devices.py` and `tensorrt.py` for GPUs)
6. `decoding.py`   what a request does with its rows' logits each step: `Sampling` (greedy / seeded),
                   `beam.py` (beam search), `classify.py` (label scoring), all over `sampling.py`'s one chain
7. `detokenize.py` token ids -> streamed text, cut at stop strings (the one place answers are decoded)
8. `response.py`   what comes back: `Response` deltas, the last one with the finish reason, tokens and timings
"""
