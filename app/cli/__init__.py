"""factpatch's command line, one module a group of commands: ``main`` (serve, db, keys, worker and the
registration of the rest), ``calibrate``, ``detect``, ``export``, ``repair``, ``train_editor``; the
eval/bench commands live with their harness in ``app.eval.cli``."""

from app.cli.main import SERVER_OPTIONS, app

__all__ = ["SERVER_OPTIONS", "app"]
