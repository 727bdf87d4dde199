"""The bundled optimizers, all ``torch.optim.Optimizer`` subclasses.

* :class:`CCE` — efficiency-scaled gradient descent (the cosmic seed's CCE step; ``mode="seed"``
  reproduces it, the default mode never steps uphill).
* :class:`QIMAD` — quantum-inspired multi-agent descent (the QIMAD seed), evaluated as one
  vectorised population (:mod:`qcd_fx.optim.population`).
* :class:`QDTSchedule` / :class:`StabilityController` — the QDT seed's learning-rate schedule.
* :class:`QuantumDynamics` / :class:`QuantumLangevin` — the quantum-dynamics global optimizers
  (benchmarked on :mod:`qcd_fx.optim.testfunctions`).

::

    from qcd_fx.optim import CCE, QIMAD
    opt = CCE(model.parameters(), lr=0.1)
    opt = QIMAD(model.parameters(), num_agents=8, seed=0)   # step(closure) as in the seed, or
    opt.step(model=model, batch=(x, y), loss_fn=F.cross_entropy)  # all agents in one vmap call
"""

from . import testfunctions
from .cce import CCE, efficiencies
from .population import BatchedEvaluator, FlatLayout, Population, PopulationOptimizer
from .qdt import QDTSchedule, StabilityController
from .qimad import QIMAD
from .quantum_dynamics import QuantumDynamics
from .quantum_langevin import QuantumLangevin

__all__ = [
    "CCE",
    "QIMAD",
    "QDTSchedule",
    "QuantumDynamics",
    "QuantumLangevin",
    "StabilityController",
    "efficiencies",
    "BatchedEvaluator",
    "FlatLayout",
    "Population",
    "PopulationOptimizer",
    "testfunctions",
]
