"""Profiles: calibration data, head/layer scorers, allocators, and the BudgetProfile file."""
