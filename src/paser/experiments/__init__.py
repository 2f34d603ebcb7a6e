"""The paper's experiments and the report: ``main`` (Tables 1 and 2, curves, figures)."""
