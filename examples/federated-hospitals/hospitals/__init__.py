"""Simulated hospitals training one model with Flower, audited by fl-audit."""
