"""fastcaps: fast, correct Capsule Networks (Sabour, Frosst & Hinton 2017).

Functional API: ``squash``, ``predictions``, ``dynamic_routing``, ``capsule_routing``,
``margin_loss``, ``reconstruction_loss``. Modules in ``fastcaps.nn``; the plain oracle in
``fastcaps.reference``; backend selection in ``fastcaps.backend``.
"""

from fastcaps import backend, nn, reference
from fastcaps.functional import (
    capsule_routing,
    dynamic_routing,
    margin_loss,
    predictions,
    reconstruction_loss,
    squash,
)

__version__ = "0.1.0"

__all__ = [
    "backend",
    "capsule_routing",
    "dynamic_routing",
    "margin_loss",
    "nn",
    "predictions",
    "reconstruction_loss",
    "reference",
    "squash",
]
