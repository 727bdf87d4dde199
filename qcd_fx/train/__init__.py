"""Training (transformed) models: :func:`fit`, :func:`evaluate`, :func:`make_optimizer` and
:func:`train_on_digits`, which the ``qcd-fx train`` command wraps.

Modules: :mod:`.loop` (:func:`fit`, :func:`evaluate`, :class:`History`), :mod:`.optimizers`
(:func:`make_optimizer`), :mod:`.run` (:func:`train_on_data`), :mod:`.digits` (:func:`train_on_digits`), :mod:`.files` (output
names, :func:`plot_history`).
"""

from .digits import train_on_digits
from .files import output_paths, plot_history
from .loop import EpochRecord, History, LossFn, evaluate, fit
from .optimizers import DEFAULT_LR, OPTIMIZERS, make_optimizer
from .run import train_on_data

__all__ = [
    "DEFAULT_LR",
    "OPTIMIZERS",
    "EpochRecord",
    "History",
    "LossFn",
    "evaluate",
    "fit",
    "make_optimizer",
    "output_paths",
    "plot_history",
    "train_on_data",
    "train_on_digits",
]
