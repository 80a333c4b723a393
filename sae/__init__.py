"""Sparse dictionaries: SAEs, transcoders, MP-SAE and top-AFA, trained from the activation store.

Importing this package registers our architectures in SAELens' registry, so every dictionary
saves and loads as SAELens `cfg.json` + `sae_weights.safetensors` (`SAE.load_from_disk`).
`import workbench` alone is enough: it imports this package as soon as SAELens is imported
(workbench/__init__.py), so plain SAELens code and notebooks load top-AFA folders too.
"""

from __future__ import annotations

from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

from workbench.sae.snmf_dictionary import SNMFSAE, SNMFSAEConfig
from workbench.sae.topafa import TopAFASAE, TopAFASAEConfig, TopAFATrainingSAE, TopAFATrainingSAEConfig
from workbench.sae.transcoder import TranscoderTrainingSAE, TranscoderTrainingSAEConfig


def _register() -> None:
    """Idempotent: SAELens raises on a second registration of the same name."""
    if "top_afa" not in SAE_CLASS_REGISTRY:
        SAE_CLASS_REGISTRY["top_afa"] = (TopAFASAE, TopAFASAEConfig)
    if "top_afa" not in SAE_TRAINING_CLASS_REGISTRY:
        SAE_TRAINING_CLASS_REGISTRY["top_afa"] = (TopAFATrainingSAE, TopAFATrainingSAEConfig)
    if "snmf" not in SAE_CLASS_REGISTRY:  # SNMF features (sae.snmf_dictionary): inference only
        SAE_CLASS_REGISTRY["snmf"] = (SNMFSAE, SNMFSAEConfig)
    if "transcoder" not in SAE_TRAINING_CLASS_REGISTRY:
        SAE_TRAINING_CLASS_REGISTRY["transcoder"] = (TranscoderTrainingSAE, TranscoderTrainingSAEConfig)


_register()

__all__ = ["SNMFSAE", "TopAFASAE", "TopAFATrainingSAE", "TranscoderTrainingSAE"]
