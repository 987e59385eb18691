"""Backends that let other frameworks send through mailgate (`mailgate.integrations.django`)."""
