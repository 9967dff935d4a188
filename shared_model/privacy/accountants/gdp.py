"""Opacus's Gaussian-DP accountant (central-limit approximation, Dong, Roth & Su 2019)."""

from opacus.accountants import GaussianAccountant

from shared_model.privacy.accountants.base import Accountant


class Gdp(Accountant):
    name = "gdp"
    label = "Opacus GDP"
    opacus_class = GaussianAccountant
