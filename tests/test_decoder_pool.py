"""The fast decoder's KV buffer pool under garbage collection: a collection that starts while `_store` holds
the pool lock runs dead stores' finalizers (`_recycle`) in that same thread; it must not deadlock."""

from __future__ import annotations

import gc
import threading

import numpy as np


def test_gc_inside_store_does_not_deadlock(llava_model, monkeypatch):
    from skin_offline.runtime.decoder import FastDecoder

    dec = llava_model.runtime.bundle.decoder
    assert isinstance(dec, FastDecoder), type(dec)
    cycle = [dec.new_store(1, 64)]
    cycle.append(cycle)  # only the cyclic collector frees this store (and runs its finalizer)
    del cycle
    real_empty = np.empty

    def collecting_empty(*a, **kw):  # what an allocation that crosses the GC threshold does
        gc.collect()
        return real_empty(*a, **kw)

    monkeypatch.setattr(np, "empty", collecting_empty)
    done = threading.Event()

    def work():
        dec.new_store(1, 96)  # a shape the pool does not hold: allocates inside the locked region
        done.set()

    threading.Thread(target=work, daemon=True).start()
    assert done.wait(30), "FastDecoder.new_store deadlocked in its own finalizer (pool lock not reentrant)"
