"""Privacy bookkeeping shared by a silo, the server and the audit (no Flower here).

ledger.py        the hash-chained, append-only JSON-lines ledger (format and integrity only)
records.py       typed record kinds on a ledger line (a DP-SGD round, a refusal, …) and the
                 one function that writes a record
accountants/     one file per Opacus accountant behind one interface (ε of a history, noise
                 calibration); what training and budget checks use
state.py         a silo's accountant state for one run (calibrated noise, history so far)
budget.py        the budget rules: may a silo run more steps? (a typed refusal when not)
recompute.py     the audit's independent ε recomputation (Opacus's and dp-accounting's own
                 classes only, never accountants/ or state.py)
one_run.py       the one-run ε lower bound of Steinke, Nasr & Jagielski (NeurIPS 2023)
audit_report.py  the ledger audit: run every check, write audit.md + audit-epsilon.png
"""
