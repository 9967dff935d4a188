"""``fedshift verify CHECKPOINT --public-key KEY``: check a checkpoint's signed manifest.

Glue only: the manifest and its checks are :mod:`shared_model.checkpoint_signature`.
:func:`refuse_unverified` is what ``evaluate`` and ``recommend`` call with ``--public-key``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """\
Check that a checkpoint folder is exactly the one the federation's server produced.

Every round the server writes CHECKPOINT/manifest.json (the SHA-256 of every file of the
checkpoint) and CHECKPOINT/manifest.sig (its Ed25519 signature) with the run's private key
(RUN/server/signing.key, mode 0600); the public key is RUN/server-signing.pub. This command
checks the signature with KEY and every file against the manifest. A changed byte, a
missing file and an added file are each named. The item-embedding cache that evaluate and
recommend write beside a checkpoint (item-index.pt, derived data) is not covered.
`fedshift evaluate` and `fedshift recommend` run the same check first when given
--public-key.
"""

EPILOG = """\
example:
  fedshift verify runs/quick/checkpoints/round-003 --public-key runs/quick/server-signing.pub
exit status: 0 intact; 1 the checkpoint does not verify (one line per file: changed,
missing, added; or the manifest's signature fails); 2 bad arguments (no such folder, KEY
is not an Ed25519 public key).
"""


def check(checkpoint: str | Path, public_key: str | Path, prog: str) -> int:
    """0 when ``checkpoint`` verifies with ``public_key``; else print why on stderr and
    return 1 (it does not verify) or 2 (bad arguments)."""
    from shared_model.checkpoint_signature import verify_checkpoint
    from shared_model.signing import SigningKeyError, load_public_key

    folder = Path(checkpoint)
    if not folder.is_dir():
        print(f"fedshift {prog}: {folder}: checkpoint folder not found", file=sys.stderr)
        return 2
    try:
        key = load_public_key(public_key)
    except SigningKeyError as e:
        print(f"fedshift {prog}: {e}", file=sys.stderr)
        return 2
    problems = verify_checkpoint(folder, key)
    for line in problems:
        print(f"fedshift {prog}: {line}", file=sys.stderr)
    if problems:
        print(f"fedshift {prog}: {folder}: does NOT verify ({len(problems)} problem(s))", file=sys.stderr)
        return 1
    return 0


def verify(args: argparse.Namespace) -> int:
    status = check(args.checkpoint, args.public_key, "verify")
    if status == 0:
        print(f"{args.checkpoint}: intact (every file matches the manifest signed by {args.public_key})")
    return status


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check a checkpoint against its signed manifest",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint folder (RUN/checkpoints/round-NNN)")
    p.add_argument("--public-key", required=True, metavar="KEY", help="the run's public key (RUN/server-signing.pub)")
    p.set_defaults(func=verify)
