"""Pure-PyTorch VAR and multi-scale VQVAE, state-dict compatible with the official checkpoints.

Imports only torch: device and dtype are arguments, nothing is printed, patched globally or downloaded.
"""

from .checkpoints import (
    CheckpointError,
    checkpoint_sha256,
    load_var,
    load_vqvae,
    resize_class_embedding,
    save_var,
    save_vqvae,
)
from .var import ATTENTION_KERNELS, VAR, KVCache, build_var, release_sampling_caches, sample_top_k_top_p
from .vqvae import OFFICIAL_PATCH_NUMS, VQVAE, build_vqvae, count_parameters

__all__ = [
    "ATTENTION_KERNELS",
    "VAR",
    "VQVAE",
    "KVCache",
    "CheckpointError",
    "OFFICIAL_PATCH_NUMS",
    "build_var",
    "build_vqvae",
    "checkpoint_sha256",
    "count_parameters",
    "load_var",
    "load_vqvae",
    "release_sampling_caches",
    "resize_class_embedding",
    "save_var",
    "save_vqvae",
    "sample_top_k_top_p",
]
