"""Defect: contributions are stored after group reduction (one number per output unit),
to save memory, instead of at full parameter shape.
"""

from .collector import CollectorAdapter, FisherCollector

DEFECT = "contributions stored after group reduction"
FAILS = {"contributions_full_shape"}


class GroupedCollector(FisherCollector):
    def store_contribution(self, sid, grads):
        self.ids.append(sid)
        for n, g in grads.items():
            sq = g * g
            self.contribs[n].append(sq.sum(dim=tuple(range(1, sq.dim()))) if sq.dim() > 1 else sq)


class Adapter(CollectorAdapter):
    name = "mutant:grouped_contributions"
    collector_class = GroupedCollector
    interference = None  # needs contributions at full shape to slice heads: impossible here
