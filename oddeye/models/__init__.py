"""Anomaly models, their shared components and the registry."""

from oddeye.models.base import AnomalyModel, create_model, list_models, load_model, register

__all__ = ["AnomalyModel", "create_model", "list_models", "load_model", "register"]
