"""The accountants a run may name (``accountant = "rdp" | "prv" | "gdp"``), one file each.

``create(name)`` gives an :class:`~shared_model.privacy.accountants.base.Accountant`;
``names()`` the accepted names; ``labels()`` name → label (``"Opacus RDP"``).
"""

from __future__ import annotations

from shared_model.privacy.accountants.base import Accountant, History
from shared_model.privacy.accountants.gdp import Gdp
from shared_model.privacy.accountants.prv import Prv
from shared_model.privacy.accountants.rdp import Rdp

_KINDS: dict[str, type[Accountant]] = {cls.name: cls for cls in (Rdp, Prv, Gdp)}

__all__ = ["Accountant", "History", "create", "names", "labels", "label"]


def create(name: str) -> Accountant:
    """The accountant called ``name``; ValueError naming the accepted ones otherwise."""
    try:
        return _KINDS[name]()
    except KeyError:
        raise ValueError(f"unknown accountant {name!r} (expected one of {', '.join(_KINDS)})") from None


def names() -> tuple[str, ...]:
    return tuple(_KINDS)


def labels() -> dict[str, str]:
    return {name: cls.label for name, cls in _KINDS.items()}


def label(name: str) -> str:
    """The label of ``name``, or ``name`` itself when it is not an accountant."""
    return labels().get(name, name)
