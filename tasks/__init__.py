"""Pipeline steps: plain functions that do the work, each module ending in thin Prefect tasks."""
