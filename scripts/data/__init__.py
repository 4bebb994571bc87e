"""Cohort data: cine files, phenotype measurement, preprocessing, the phantom, the prepared-cohort reader."""
