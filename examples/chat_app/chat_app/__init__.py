"""A small chat service that keeps its conversations with hermes_orm."""
