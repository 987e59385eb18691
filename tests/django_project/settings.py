"""The settings of a Django project that sends through mailgate over HTTP: the five lines the
README shows, with the URL and token from the environment the test sets."""

import os

SECRET_KEY = "django-insecure-test-only"
INSTALLED_APPS: list[str] = []
USE_TZ = True
TIME_ZONE = "UTC"  # Django sets TZ for the whole process: the rest of the suite runs in UTC too

EMAIL_BACKEND = "mailgate.integrations.django.EmailBackend"
MAILGATE_URL = os.environ["TEST_MAILGATE_URL"]
MAILGATE_TOKEN = os.environ["TEST_MAILGATE_TOKEN"]
