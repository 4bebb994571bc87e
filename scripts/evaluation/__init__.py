"""Evaluation of generated cines: fidelity, phenotype adherence, privacy, speed, and the report."""
