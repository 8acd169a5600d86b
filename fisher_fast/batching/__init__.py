"""Batches into units and rows: input checks, units, row losses, label draws, chunk sizes."""
