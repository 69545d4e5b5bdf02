"""Scaling laws: sweeps of GPT sizes × token budgets (`sweep`), Chinchilla and Kaplan fits with
compute-optimal allocation (`fit`), and their figures (`plots`, needs matplotlib)."""

from lmstack.scaling.fit import HOFFMANN, ChinchillaLaw, PowerLaw, ScalingFit, fit, fit_chinchilla, fit_kaplan

__all__ = ["HOFFMANN", "ChinchillaLaw", "PowerLaw", "ScalingFit", "fit", "fit_chinchilla", "fit_kaplan"]
