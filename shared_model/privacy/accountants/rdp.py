"""Opacus's Rényi-DP accountant (the default)."""

from opacus.accountants import RDPAccountant

from shared_model.privacy.accountants.base import Accountant


class Rdp(Accountant):
    name = "rdp"
    label = "Opacus RDP"
    opacus_class = RDPAccountant
