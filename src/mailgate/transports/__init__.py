"""Transports: how a message leaves mailgate (smtp; graph and capture to come). See `base`."""

from .base import Delivery, Outcome, RecipientResult, Transport

__all__ = ["Delivery", "Outcome", "RecipientResult", "Transport"]
