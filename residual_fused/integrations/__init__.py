"""Conversions of third-party model code to the fused Add & Norm."""
