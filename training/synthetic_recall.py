"""Synthetic recall: can a model use a definition it read far outside its local context?

    OMP_NUM_THREADS=1 python training/synthetic_recall.py   # documents, two trainings, evaluation, table and plot

The task, the two models and the report: `memorizing_experiments.synthetic_recall`.
"""

from memorizing_experiments.synthetic_recall import main

if __name__ == "__main__":
    main()
