"""The experiments around `memorizing_hf`: real weights and documents fetched offline, our corpora and their splits,
the training recipes, the evaluation suites, the demo and what the benchmark scripts share.

Installed beside the library with its own dependencies: `pip install "memorizing-hf[experiments]"`. The library
(`memorizing_hf`) never imports this package.
"""
