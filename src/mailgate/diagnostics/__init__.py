"""Diagnostics: what a failure means and how to fix it (the catalogue); the test e-mail comes later."""

from .catalogue import Explanation, explain_graph_error, explain_token_error

__all__ = ["Explanation", "explain_graph_error", "explain_token_error"]
