"""``dynamics`` with every dropout off: ``python benchmarks/no_dropout.py train ...`` (also as the
script of ``torchrun``). ``benchmarks/data_parallel.py --no-dropout`` uses it to show that dropout
alone separates N processes from one on models that train with it (BERT's 0.1 in MiniLM).

Two places draw dropout in transformers' models: ``nn.Dropout`` modules, and the ``dropout_p`` of
``scaled_dot_product_attention``; both are switched off here, for measurement only."""

import sys

import torch
import torch.nn.functional as F

_sdpa = F.scaled_dot_product_attention


def _sdpa_without_dropout(*args, dropout_p=0.0, **kwargs):
    return _sdpa(*args, dropout_p=0.0, **kwargs)


torch.nn.Dropout.forward = lambda self, x: x
F.scaled_dot_product_attention = _sdpa_without_dropout

if __name__ == "__main__":
    from dynamics.cli import main

    sys.exit(main(sys.argv[1:]))
