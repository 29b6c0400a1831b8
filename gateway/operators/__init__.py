"""The operators' side: the admin API and dashboard, and the metrics."""
