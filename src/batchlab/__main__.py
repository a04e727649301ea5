"""``python -m batchlab`` runs the CLI."""

from batchlab.cli import main

main()
