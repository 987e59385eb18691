"""The `mailgate` command line. Start-up stays fast: commands import what they need inside.

Modules: `_common` (the app, exit statuses, shared plumbing), `send`, `queue` (worker and
queue), `settings` (tenants, servers, keys, db), `serve` (the API and admin UI, tokens),
`testmail` (`mailgate test`), `users` (admin UI users), `templates` (notification templates),
`support` (support requests, system settings).
"""

from . import queue, send, serve, settings, support, templates, testmail, users  # noqa: F401  (registers the commands)
from ._common import app


def main() -> None:
    app()
