"""Train a memory adapter (one memory bias per query head of joint mode) for recall from far back.

    python training/memory_adapter.py [--layers 16-24] [--memory-sharpness 1] [--steps 240] [--out runs/memory_adapter]

The recipe and its reasons: `memorizing_experiments.memory_adapter`.
"""

from memorizing_experiments.memory_adapter import main

if __name__ == "__main__":
    main()
