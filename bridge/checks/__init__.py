"""The checks role: CI results from the results exchange, posted to Patchwork as checks."""
