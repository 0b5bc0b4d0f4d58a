"""Analysis layer of the distill-or-annotate study: frontiers and result bookkeeping."""
