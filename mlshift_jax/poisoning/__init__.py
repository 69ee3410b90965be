"""Training-time changes to a dataset: wrong labels, BadNets triggers, mixtures, and the
trigger families (patch, checkerboard, blended, sparse, SIG, WaNet warp). Imports `core`, `data`.

`POISONINGS` (kind -> `Poisoning`: its config class and function) and the configs are
re-exported here, so a module can move without breaking users."""

from mlshift_jax.poisoning.poison import (
    POISONINGS,
    Blended,
    Clean,
    Mixture,
    Patch,
    Poisoning,
    Sig,
    Sparse,
    Trigger,
    Warp,
    WrongLabel,
    apply,
    describe,
    get_poisoning,
    make_config,
    triggered,
)
from mlshift_jax.poisoning.triggers import FAMILIES, TriggerArrays

__all__ = [
    "FAMILIES", "POISONINGS", "Blended", "Clean", "Mixture", "Patch", "Poisoning", "Sig",
    "Sparse", "Trigger", "TriggerArrays", "Warp", "WrongLabel", "apply", "describe",
    "get_poisoning", "make_config", "triggered",
]
