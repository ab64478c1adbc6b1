"""Retrieval evaluation: per-query hits, bootstrap intervals, the compatibility matrix and reports."""
