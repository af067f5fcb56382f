"""Train the paper's CapsNet on MNIST: ``python train_mnist.py`` (see ``--help``).

A thin wrapper: the CLI is ``fastcaps.train``, installed as ``fastcaps-train`` and runnable as
``python -m fastcaps.train``. Several GPUs or nodes: ``torchrun --nproc_per_node N
train_mnist.py ...`` (DDP; --batch-size is per process)."""

import sys

from fastcaps.train import main

if __name__ == "__main__":
    sys.exit(main(prog="train_mnist.py"))
