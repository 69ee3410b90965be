"""Test-time changes: noise, FGSM, PGD (`evasion`), the adaptive attacks that judge defenses
(EOT, BPDA, Square, transfer: `adaptive`), APGD and AutoAttack, the study's defenses and the
obfuscated-gradient flags. Imports `core`, `data`, `poisoning`, `models`.

`ATTACKS` (name -> `Attack`) is assembled here from the records each attack module exports;
adding an attack is one module with a `RECORDS` tuple, imported and listed below.
"""

from mlshift_jax.attacks import adaptive, apgd, autoattack, evasion, fab, mifgsm
from mlshift_jax.attacks._common import Attack
from mlshift_jax.attacks.adaptive import bpda_pgd, eot_pgd, square, transfer
from mlshift_jax.attacks.apgd import apgd_ce, apgd_dlr, apgd_t
from mlshift_jax.attacks.defenses import DEFENSES, Defense, get_defense
from mlshift_jax.attacks.evasion import (
    attack_key,
    fgsm,
    fgsm_targeted,
    gradient_report,
    input_grad,
    noise_gauss,
    noise_sign,
    noise_uniform,
    pgd,
    pgd_targeted,
    sweep,
)
from mlshift_jax.core.errors import ConfigError

ATTACKS: dict[str, Attack] = {a.name: a for a in (
    *evasion.RECORDS,
    *adaptive.RECORDS,
    *apgd.RECORDS,
    *autoattack.RECORDS,
    *mifgsm.RECORDS,
    *fab.RECORDS,
)}


def get_attack(name: str) -> Attack:
    """The registered attack called `name`; ConfigError naming the known ones otherwise."""
    try:
        return ATTACKS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown attack {name!r}; expected one of {sorted(ATTACKS)}") from None


__all__ = [
    "ATTACKS", "DEFENSES", "Attack", "Defense", "apgd_ce", "apgd_dlr", "apgd_t", "attack_key",
    "bpda_pgd", "eot_pgd", "fgsm", "fgsm_targeted", "get_attack", "get_defense",
    "gradient_report", "input_grad", "noise_gauss", "noise_sign", "noise_uniform", "pgd",
    "pgd_targeted", "square", "sweep", "transfer",
]
