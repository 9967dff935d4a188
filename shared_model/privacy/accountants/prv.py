"""Opacus's privacy-random-variable accountant (Gopi, Lee & Wutschitz 2021)."""

from opacus.accountants import PRVAccountant

from shared_model.privacy.accountants.base import Accountant


class Prv(Accountant):
    name = "prv"
    label = "Opacus PRV"
    opacus_class = PRVAccountant
