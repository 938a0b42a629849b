"""Train a memorizing model on long documents with the Hugging Face Trainer, from a YAML recipe.

    python training/train.py configs/tiny_smoke.yaml [section.key=value ...]
    accelerate launch --config_file configs/accelerate/ddp.yaml training/train.py configs/smollm2_stdlib.yaml

The recipe format and the code that runs it: `memorizing_experiments.train` (training/README.md).
"""

from memorizing_experiments.train import main

if __name__ == "__main__":
    main()
