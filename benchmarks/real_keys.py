"""Build the cache of real memory keys (SmolLM2-135M reading the CPython standard library) ahead of `make bench`.

    python benchmarks/real_keys.py [--entries 1048576]

What the keys are and where they are cached: `memorizing_experiments.real_keys`.
"""

from __future__ import annotations

import argparse

from memorizing_experiments.real_keys import CHECKPOINTS, cache_file, real_keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=CHECKPOINTS[-1])
    args = parser.parse_args()
    tensors = real_keys(args.entries)
    print({name: tuple(tensor.shape) for name, tensor in tensors.items()}, "in", cache_file(args.entries))


if __name__ == "__main__":
    main()
