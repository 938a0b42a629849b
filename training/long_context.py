"""Long-context recall (passkey, definitions) against prompt length and depth, per setting (full attention, a
window, kNN memory).

    python training/long_context.py configs/long_context.yaml                                   # the whole suite
    python training/long_context.py configs/long_context.yaml lengths=[4096,8192] settings=memory tasks=passkey
    python training/long_context.py configs/long_context.yaml --report-only --out docs/results/long_context

The suite format and the code that runs it: `memorizing_experiments.long_context`.
"""

from memorizing_experiments.long_context import main

if __name__ == "__main__":
    main()
