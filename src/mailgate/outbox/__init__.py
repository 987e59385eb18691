"""The durable outbox: messages stored until a mail server accepts them, and the worker."""
