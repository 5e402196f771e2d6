"""Read-only views of studies: ablation tables, exports and the web page."""
