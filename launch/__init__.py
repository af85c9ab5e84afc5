"""End-to-end pipeline, sweeps and launch helpers (Cloud TPU VMs, multi-host)."""
