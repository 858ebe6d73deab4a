"""The study this toolkit was built for (docs/results.md): its grid files and the report that
re-derives every number the results quote (``python -m studies.report RUNS_DIR``)."""
