"""``python -m trasce`` (and ``accelerate launch -m trasce``) is the ``trasce`` command."""

from trasce.cli import console

console()
