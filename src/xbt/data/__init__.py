"""Datasets of image-caption pairs, the testbed, and the content-addressed feature cache."""
