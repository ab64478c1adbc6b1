"""Evaluation, the top of the library: the compatibility matrix (`matrix`), one run over every method
(`runner`), the calibrated rows (`calibrated`), the cross-validated protocol (`crossval`), backfill curves
(`backfill_curve`), the report and the recommendation. Nothing below imports it."""
