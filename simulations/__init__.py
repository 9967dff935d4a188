"""Research tooling around the federated app: the evaluation harness (:mod:`.evaluation`),
the experiment grid (:mod:`.experiment`), dataset tools (:mod:`.datasets`) and
benchmarks (:mod:`.benchmarks`)."""
