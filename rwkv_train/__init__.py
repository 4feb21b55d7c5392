"""rwkv_train: train RWKV language models with Lightning and DeepSpeed.

The package is laid out by job:
  config        YAML -> typed dataclasses, dotted overrides, validation
  models/       one file per RWKV generation (v7 today) plus shared pieces
  ops/          the WKV recurrences behind one interface per generation
  data/         binidx files, the World tokenizer's corpora, window sampling
  lightning     the LightningModule: loss, optimiser groups, LR schedule
  checkpoint    official weights-only files and atomic resume checkpoints
  trainer       builds the Lightning Trainer (strategy, callbacks, logging)
"""

__version__ = "0.1.0"
