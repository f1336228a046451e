"""Analyses and rewrites on the Dynamo FX graph, each a small pass (see pass_manager)."""
