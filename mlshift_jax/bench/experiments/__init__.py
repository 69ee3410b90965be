"""The bench's experiments, one module each; each exports one `Experiment` record
(`bench.cells.Experiment`): its matrix block and schema, its cells, how to compute one, its
sections of tables.md, its headline finding and its figures.

`EXPERIMENTS` is in run order: a matrix's cells are each experiment's cells in this order
(tables.md orders the sections by each record's `place`). `matrix`, `runner` and `report`
only iterate over it. Adding an experiment: a module exporting `EXPERIMENT`, and its entry
here.
"""

from mlshift_jax.bench.cells import Experiment
from mlshift_jax.bench.experiments import (
    clean,
    defenses,
    detect,
    grid,
    input_attacks,
    poison,
    speed,
    stability,
)

EXPERIMENTS = (grid.EXPERIMENT, clean.EXPERIMENT, stability.EXPERIMENT,
               input_attacks.EXPERIMENT, speed.EXPERIMENT, poison.EXPERIMENT, detect.EXPERIMENT,
               defenses.EXPERIMENT)
BY_BLOCK = {e.block: e for e in EXPERIMENTS}

__all__ = ["BY_BLOCK", "EXPERIMENTS", "Experiment"]
