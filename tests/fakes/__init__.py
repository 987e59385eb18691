"""Fake HTTP services (OAuth2 identity provider, Microsoft Graph mail) for tests: real servers on 127.0.0.1."""
