"""fishercheck: the command line (``fishercheck run`` / ``fishercheck conform``), reports,
plots, the embedded default model and tasks, and the fisher_fast conformance adapter.

The one package that imports both fisher_ref (the oracle) and fisher_fast. See docs/cli.md.
"""
