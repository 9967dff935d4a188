"""`fedshift`: federated, privacy-preserving interest-migration training.

Each sub-command lives in its own module and registers itself through ``add_parser``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fedshift import (audit_cmd, bench_cmd, data_cmd, deploy_cmd, evaluate_cmd, experiment_cmd, recommend_cmd,
                      simulate_cmd, verify_cmd)

DESCRIPTION = """\
fedshift learns how shoppers' interests migrate between categories, federated over data
silos that never share raw data: each silo fine-tunes LoRA adapters of a BERT encoder with
Opacus DP-SGD and a Flower server averages only the adapters.

commands:
  data validate DIR     check a dataset folder; exit 2 and one line per problem if bad
  data describe [DIR]   silos (their platforms), users, events, classes, history lengths,
                        migration rates, platform switches
  simulate              run the federated DP simulation on a dataset (default: bundled)
  deploy certs|keys|local  TLS certificates, SuperNode keys, or a whole deployment on
                        127.0.0.1 (SuperLink + one SuperNode process per silo)
  evaluate              a checkpoint and the baselines on held-out users (ranking,
                        next interest, migration detection, cross-platform)
  recommend             top-k items, next interests and migration score for a history
  audit RUN_DIR         check a run's privacy ledger; --canaries M for an empirical bound;
                        --silo-keys DIR checks the silos' signatures on it
  verify CHECKPOINT     check a checkpoint against the server's signed manifest
  experiment            the experiment grid (baselines, federated DP at several ε, local-only,
                        centralised, leave-one-platform-out): results.md/.csv and plots
  bench                 DP overhead, traffic, serving latency, catalogue throughput and
                        scale, measured on this machine against their goals

A silo holds one platform's users, or one region's users on every platform (a region
silo, its silo.json lists them). --layout NAME on data, simulate, experiment, evaluate and
deploy local picks a dataset's other cut of the same users (layouts/NAME/, e.g. the bundled
regions); docs/data-format.md.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedshift",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    data_cmd.add_parser(sub)
    simulate_cmd.add_parser(sub)
    deploy_cmd.add_parser(sub)
    evaluate_cmd.add_parser(sub)
    recommend_cmd.add_parser(sub)
    audit_cmd.add_parser(sub)
    verify_cmd.add_parser(sub)
    experiment_cmd.add_parser(sub)
    bench_cmd.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
