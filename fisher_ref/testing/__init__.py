"""Test support shared by the test suites, the property tests and the conformance harness.

Nothing here defines a Fisher quantity: it builds tiny models and batches, and compares
results with a report that says where they differ. ``fisher_fast`` never imports it.
"""
