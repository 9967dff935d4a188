"""Run a command with its own torch thread count, restoring the caller's afterwards."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable


def restores_torch_threads(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Decorator: ``--threads`` is per call, so the process's thread count is put back."""

    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        import torch

        threads = torch.get_num_threads()
        try:
            return fn(args)
        finally:
            torch.set_num_threads(threads)

    return wrapper
