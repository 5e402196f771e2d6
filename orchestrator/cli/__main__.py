"""``python -m bnnctl.orchestrator.cli`` (what a submitted Ray job runs on the cluster)."""
from . import main

main()
