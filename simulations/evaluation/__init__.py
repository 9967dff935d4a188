"""Offline, centralised evaluation of checkpoints and baselines on held-out users.

* :mod:`.harness`: cases (per platform, ``switch``, cold-start ``A->B``; platform or region silos), per-user results of any predictor
  through the one scoring path (:mod:`shared_model.scoring`), summaries and paired
  differences, the text table;
* :mod:`.bootstrap`: the paired bootstrap over users;
* :mod:`.baselines`: the non-learned reference predictors, fitted on the train split.
"""

from simulations.evaluation.baselines import (
    CategoryMarkov,
    HistoryLogit,
    ItemCooccurrence,
    MostPopular,
    TrainStats,
    all_baselines,
)
from simulations.evaluation.bootstrap import Estimate, bootstrap_mean_ci, paired_bootstrap, paired_difference
from simulations.evaluation.cases import (
    SWITCH,
    Case,
    cross_cases,
    history_source,
    is_switch,
    platform_cases,
    switch_cases,
)
from simulations.evaluation.harness import (
    DIFFERENCE_METRICS,
    METRICS,
    ModelPredictor,
    OwnPlatformHistory,
    Predictor,
    concat,
    differences,
    evaluate,
    format_table,
    group_order,
    group_seed,
    new_interest_hit,
    per_user,
    summarise,
    take,
)

__all__ = [
    "DIFFERENCE_METRICS", "METRICS", "SWITCH", "Case", "CategoryMarkov", "Estimate", "HistoryLogit", "ItemCooccurrence",
    "ModelPredictor", "MostPopular", "OwnPlatformHistory", "Predictor", "TrainStats", "all_baselines", "bootstrap_mean_ci", "concat",
    "cross_cases", "differences", "evaluate", "format_table", "group_order", "group_seed", "history_source",
    "is_switch", "new_interest_hit", "paired_bootstrap", "paired_difference", "per_user", "platform_cases",
    "summarise", "switch_cases", "take",
]
