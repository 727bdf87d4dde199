"""A small, honest training loop for (transformed) models: :func:`fit`, :func:`evaluate`, and
:func:`train_on_digits`, which the ``qcd-fx train`` command wraps.

:func:`fit` drives three kinds of optimizer:

* population optimizers (:class:`~qcd_fx.optim.QIMAD`): ``optimizer.step(model=, batch=, loss_fn=)``,
  which evaluates every agent on the same batch in one vectorised call (and tells the optimizer
  the total number of steps, so its cooling schedule runs);
* closure optimizers (``torch.optim.LBFGS``, or any optimizer with ``requires_closure = True``):
  ``optimizer.step(closure)``;
* everything else: ``zero_grad`` / ``backward`` / ``step``.

It returns a :class:`History` (per epoch: mean training loss, training accuracy where the
optimizer's forward pass is visible, validation loss and accuracy, wall time of the training
part of the epoch, learning rate). Progress is drawn with Rich on stderr and can be turned off.

Modules: :mod:`.loop` (:func:`fit`, :func:`evaluate`, :class:`History`), :mod:`.optimizers`
(:func:`make_optimizer`), :mod:`.digits` (:func:`train_on_digits`), :mod:`.files` (output
names, :func:`plot_history`).
"""

from .digits import digits_input, train_on_digits
from .files import output_paths, plot_history
from .loop import EpochRecord, History, LossFn, evaluate, fit
from .optimizers import DEFAULT_LR, OPTIMIZERS, make_optimizer

__all__ = [
    "DEFAULT_LR",
    "OPTIMIZERS",
    "EpochRecord",
    "History",
    "LossFn",
    "digits_input",
    "evaluate",
    "fit",
    "make_optimizer",
    "output_paths",
    "plot_history",
    "train_on_digits",
]
