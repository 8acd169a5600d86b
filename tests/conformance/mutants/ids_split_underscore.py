"""Defect: sample ids parsed as "<document>_<chunk>" by splitting on "_", and contributions
merged per document, so "doc_a_1" and "doc_2" are confused and ids with several "_" lose
their tail.
"""

import torch

from .collector import CollectorAdapter, FisherCollector

DEFECT = 'sample ids parsed by splitting on "_"'
FAILS = {"contributions_keyed_by_ids"}


class DocumentCollector(FisherCollector):
    def store_contribution(self, sid, grads):
        doc = str(sid).split("_")[0]
        if doc in self.ids:
            k = self.ids.index(doc)
            for n, g in grads.items():
                self.contribs[n][k] = self.contribs[n][k] + g * g
            return
        self.ids.append(doc if isinstance(sid, str) else sid)
        for n, g in grads.items():
            self.contribs[n].append(g * g)

    def contributions(self):
        return list(self.ids), {n: torch.stack(v) for n, v in self.contribs.items()}


class Adapter(CollectorAdapter):
    name = "mutant:ids_split_underscore"
    collector_class = DocumentCollector
