"""The CI report (build.py: `python -m steerline.report`, `make report`), the paired changes
against a base commit (paired.py) and the headlines across seeds (seeds.py). Its tables and
number formats are steerline.core.tables, shared with the CLI and the docs."""
