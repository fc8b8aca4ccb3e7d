"""lit_impala: IMPALA (Espeholt et al. 2018) with a torchrl actor pipeline and a Lightning learner."""

__version__ = "0.2.0"
