"""Study specs, planning, state, execution and tracking.

``bnnctl.results(study, db=None)`` (also ``bnnctl.orchestrator.results``) gives a study's (or tuning's) results as a pandas
DataFrame, one row per variant (or trial); see :mod:`bnnctl.orchestrator.results` for the columns.
"""


def results(study: str, db: str | None = None):
    """A study's or tuning's results as a pandas DataFrame (see :func:`.results.results`)."""
    from .results import results as _results

    return _results(study, db)
