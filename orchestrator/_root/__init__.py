"""The top-level ``bnnctl`` package (setuptools maps it to this folder: the project's top-level
folders are its layers). It holds the public entry points a notebook uses, imported lazily so that
``import bnnctl`` stays instant:

    import bnnctl
    df = bnnctl.results("quickstart")          # one row per variant (see bnnctl.orchestrator.results)
"""


def results(study: str, db: str | None = None):
    """A study's or tuning's results as a pandas DataFrame: one row per variant (or trial); ``db``
    the state database URL (default: ``.bnnctl/state.db`` of the working folder, or ``$BNNCTL_DB``)."""
    from bnnctl.orchestrator.results import results as _results

    return _results(study, db)
