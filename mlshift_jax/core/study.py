"""The numbers the study ("Detection of ML Behavior Changes", UTD Team 4) published, as data.

The reports put our measurements beside these; nothing here is computed.
"""

from __future__ import annotations

# the study's one-hot training targets: 0.01 everywhere, 0.99 at the label (seed code, E1)
TARGET_LOW, TARGET_HIGH = 0.01, 0.99

# E1: the clean model (784-200-10 sigmoid MLP, per-sample SGD). The slides print
# "Performance = 0.963" (accuracy); the attack table's first row gives P/R/F1/confidence.
# Its recall, 0.9576, is the accuracy of a model with that row (macro recall ~ accuracy on
# MNIST's near-balanced test set): "0.963" sits between one and two epochs.
E1 = {"accuracy": 0.963, "precision": 0.9585, "recall": 0.9576, "f1": 0.9577,
      "confidence": 0.9577}

# E3: FGSM on 6,000 test images ("125 hours we use to generate gradient for all images").
E3_IMAGES = 6000
E3_HOURS = 125.0
E3 = {
    0.0: {"precision": 0.9585, "recall": 0.9576, "f1": 0.9577, "confidence": 0.9577},
    0.1: {"precision": 0.8254, "recall": 0.7705, "f1": 0.7765, "confidence": 0.8235},
    0.2: {"precision": 0.6554, "recall": 0.4240, "f1": 0.4427, "confidence": 0.7841},
    0.3: {"precision": 0.6137, "recall": 0.3034, "f1": 0.3291, "confidence": 0.7950},
}

# E4-E7: the poisoning findings, as the slides state them (no tables were published).
E4_PATCH_6X6_BELOW = 0.25          # "noisy" data, 6x6 patch: performance under 0.25
E6_WRONG_LABEL_80 = 0.10           # wrong label at 80%: "about 10%"
E7_MIXTURE_80 = 0.9188333333333333  # mixture (trigger + label 3) at 80%
E7_TARGET = 3


def e3_seconds_per_image() -> float:
    """The study's gradient cost per image: 125 h / 6,000 images = 75 s."""
    return E3_HOURS * 3600.0 / E3_IMAGES
