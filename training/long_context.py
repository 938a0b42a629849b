"""Long-context recall (passkey, definitions) against prompt length and depth, per setting.

    python training/long_context.py configs/long_context.yaml [key=value ...] [--report-only]

The suite format and the code that runs it: `memorizing_experiments.long_context`.
"""

from memorizing_experiments.long_context import main

if __name__ == "__main__":
    main()
