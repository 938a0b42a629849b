"""Perplexity of held-out long documents against memory size, in the form of the paper's Table 4.

    python training/evaluate.py configs/eval_table4.yaml                  # every model of the suite, then the report
    python training/evaluate.py configs/eval_table4.yaml --models zero_shot   # some models (e.g. one per process)
    python training/evaluate.py configs/eval_table4.yaml --report-only    # table and plot from the results so far

The suite format and the code that runs it: `memorizing_experiments.evaluate`.
"""

from memorizing_experiments.evaluate import main

if __name__ == "__main__":
    main()
