"""Integrations with training frameworks and trackers, one module each, imported on demand.

``lightning`` (``SelfTuneCallback``), ``huggingface`` (``wrap_trainer_optimizer``,
``SelfTuneTrainerCallback``), ``tensorboard`` (``TensorBoardWriter``) and ``mlflow``
(``MLflowWriter``).  This package imports none of them, so ``import selftune`` never needs the
frameworks; import the module you use, e.g. ``from selftune.integrations.lightning import ...``.
"""
