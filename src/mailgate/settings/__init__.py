"""Mail server settings: the document (`document`), later its storage and resolution."""

from .document import MailServer, load_server, parse_server

__all__ = ["MailServer", "load_server", "parse_server"]
