"""Data for the paper's six datasets: validated JSONL reading, file specs, budget slices, downloads."""
