"""The paper's baselines: routed over PaSeR's pool (random policy, oracle, IDK cascade) and
whole-image (monolithic models, MatPhase)."""
