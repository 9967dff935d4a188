"""The experiment grid of ``fedshift experiment``: every method trained and evaluated in one
harness, on one split, on the same users, with 95 % paired-bootstrap intervals.

plan.py         presets, the plan (training runs and methods) and its time estimate
run.py          trains the plan's runs (federated ones through fedshift.simulation.run_simulation)
                and drives the whole experiment (run_experiment)
evaluate.py     every method on the held-out users, through simulations.evaluation
report.py       results.csv / results.json / results.md
plots.py        the plots
centralised.py  the centralised, non-private trainer
"""
