"""Entry points of processes that assets launch (torchrun workers); they import dagster_pipes, never dagster."""
