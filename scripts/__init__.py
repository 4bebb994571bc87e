"""Cardiac phenotype-guided cine generation (CPGG) bundle: data, phantom, phenotypes and models."""
