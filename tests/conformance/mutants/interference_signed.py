"""Defect: interference always uses the signed gradient of task B (phi = identity), also
in the default abs mode.
"""

from .collector import CollectorAdapter

DEFECT = "signed phi in abs mode"
FAILS = {"interference_nonnegative", "interference_agreement"}


class Adapter(CollectorAdapter):
    name = "mutant:interference_signed"

    def phi(self, g, signed):
        return g
