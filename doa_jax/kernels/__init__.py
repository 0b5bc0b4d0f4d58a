"""Hand-written kernels for backends where XLA leaves speed on the table."""
