"""Defect: interference ignores ``signed=True`` and always takes |g^B| (phi = abs)."""

from .collector import CollectorAdapter

DEFECT = "signed=True ignored"
FAILS = {"interference_signed_agreement"}
DIAGNOSIS = "abs φ"


class Adapter(CollectorAdapter):
    name = "mutant:signed_ignored"

    def phi(self, g, signed):
        return g.abs()
