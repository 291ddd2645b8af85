"""factpatch's command line, one module a group of commands: ``main`` (serve, db, keys, worker and the
registration of the rest), ``evaluate`` (eval, eval-subset, bench), ``compare``, ``calibrate``, ``detect``,
``export``, ``repair``, ``train_editor``, and ``common`` (what they share)."""

from app.cli.main import SERVER_OPTIONS, app

__all__ = ["SERVER_OPTIONS", "app"]
