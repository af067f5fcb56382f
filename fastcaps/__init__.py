"""fastcaps: fast, correct Capsule Networks (Sabour, Frosst & Hinton 2017).

Functional API: ``squash``, ``predictions``, ``dynamic_routing``, ``capsule_routing``
(dynamic routing); ``exp_squash``, ``attention_routing``, ``capsule_attention_routing``
(Efficient-CapsNet's self-attention routing); ``margin_loss``, ``reconstruction_loss``.
Modules in ``fastcaps.nn``; the plain oracle in ``fastcaps.reference``; backend selection in
``fastcaps.backend``.
"""

from fastcaps import backend, nn, reference
from fastcaps.functional import (
    attention_routing,
    capsule_attention_routing,
    capsule_routing,
    dynamic_routing,
    exp_squash,
    margin_loss,
    predictions,
    reconstruction_loss,
    squash,
)

__version__ = "0.1.0"

__all__ = [
    "attention_routing",
    "backend",
    "capsule_attention_routing",
    "capsule_routing",
    "dynamic_routing",
    "exp_squash",
    "margin_loss",
    "nn",
    "predictions",
    "reconstruction_loss",
    "reference",
    "squash",
]
