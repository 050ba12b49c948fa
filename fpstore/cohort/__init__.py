"""Cohorts: clinical tables (TCGA Biotab, CSV), slide lists (globs, GDC manifests), cohorts."""
