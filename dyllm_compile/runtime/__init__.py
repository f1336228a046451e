"""Per-compiled-graph state: caches, step policy, variant selection (graph_runtime); row helpers (rows)."""
