"""Integrations of hermes_orm with agent frameworks."""
