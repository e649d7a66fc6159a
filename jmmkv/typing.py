"""Dimension key used in einsum strings and as shape suffixes on tensor names.

    B batch          T query tokens       S cache slots        C kept capacity
    W obs. window    L layers             N query heads        K kv heads
    G = N / K        H head dim           D model width        F MLP width
    V vocab          P vision patches     M decode steps

A tensor named ``k_LBKCH`` has shape [L, B, K, C, H]; ``scores_BKS`` has [B, K, S].
"""

from typing import Any

import jax
import numpy as np

Array = jax.Array
Params = Any  # a nested dict pytree of arrays, as returned by `flax.linen.Module.init`
DType = Any
HostArray = np.ndarray

# Modality ids carried by every token and every cache slot.
PAD, TEXT, IMAGE, VIDEO = 0, 1, 2, 3

# A finite "minus infinity" for masked attention scores: fully masked rows stay NaN-free and
# vanish when blocks are merged.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
