"""The `mailgate` command line. Start-up stays fast: commands import what they need inside.

Modules: `_common` (the app, exit statuses, shared plumbing), `send`, `queue` (worker and
queue), `settings` (tenants, servers, keys, db), `serve` (the API and admin UI, tokens),
`testmail` (`mailgate test`), `users` (admin UI users).
"""

from . import queue, send, serve, settings, testmail, users  # noqa: F401  (registers the commands)
from . import support as support_commands  # noqa: F401  (support request, system show|set)
from ._common import app


def main() -> None:
    app()
