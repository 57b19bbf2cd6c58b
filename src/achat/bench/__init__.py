"""``achat-bench``: a load generator that speaks protocol v1 from several processes."""
