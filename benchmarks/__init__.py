"""Speed benchmarks: ``mixer-study bench`` runs one module per section (``benchmarks.run``); ``benchmarks.vs_timm``
compares our training step with timm's."""
