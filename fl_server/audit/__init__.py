"""``fedshift audit``: check a run's privacy claims without trusting the training code.

accounting.py  recompute ε from the ledger with Opacus and Google's dp-accounting
one_run.py     the one-run ε lower bound of Steinke, Nasr & Jagielski (NeurIPS 2023)
canary.py      a fresh canary experiment that measures that lower bound
report.py      run all checks, write audit.md + audit-epsilon.png
"""
