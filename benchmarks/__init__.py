"""Speed benchmarks behind ``mixer-study bench`` (``benchmarks.run``), and ``benchmarks.vs_timm``."""
