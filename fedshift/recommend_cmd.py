"""Placeholder: registered by fedshift/cli.py; its owner replaces this module."""

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    return None
