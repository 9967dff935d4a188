"""The experiment grid of ``fedshift experiment``: every method trained and evaluated in one
harness, on one split, on the same users, with 95 % paired-bootstrap intervals.

plan.py         presets, the plan (training runs and methods) and its time estimate
run.py          trains the plan's runs (federated ones through fedshift.simulation.run_simulation)
                and drives the whole experiment (run_experiment)
evaluate.py     every method on the held-out users, through simulations.evaluation
per_silo.py     federated vs local-only on each silo's users (Table 4)
curves.py       learning curves: every round's checkpoint on validation users (Table 5)
report.py       results.csv / per-silo.csv / learning-curve.csv / results.json / results.md
plots.py        the plots
centralised.py  the centralised, non-private trainer
"""
