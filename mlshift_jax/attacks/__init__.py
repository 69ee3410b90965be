"""Test-time changes: noise, FGSM, PGD (`evasion`), the study's defenses, the adaptive
attacks that judge them (EOT, BPDA, Square, transfer) and the obfuscated-gradient flags.
Imports `core`, `data`, `poisoning`, `models`."""
