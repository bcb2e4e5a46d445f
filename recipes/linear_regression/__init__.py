"""The paper's simplest instance: federated multi-response linear regression.

Clients' coefficient matrices share a low-rank column space with client-specific coefficients;
a fraction of clients is contaminated; local least-squares fits are the preliminary estimators
that CLAIR aggregates. ``python -m clair_lightning.recipes.linear_regression`` checks every claim
of the abstract and writes a results table and plots.
"""

from .data import RegressionFederation, make_federation

__all__ = ["RegressionFederation", "make_federation"]
