"""A Django project that sends its e-mail through mailgate (tests/test_django_backend.py)."""
