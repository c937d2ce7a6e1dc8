"""Contracts shared by the engine and the gateway (torch-free)."""
