"""Scaling laws with uncertainty: forms, fitting, bootstrap intervals, prediction intervals (pure numpy/scipy)."""
