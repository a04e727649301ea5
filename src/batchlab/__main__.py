"""``python -m batchlab`` and the ``batchlab`` script: arm Ctrl-C, then run the CLI."""

from __future__ import annotations

import signal


def main() -> None:
    """Run the CLI; Ctrl-C works from the first moment, even where SIGINT was inherited ignored.

    The CLI's own handler (``batchlab.cli._interrupt``) takes over once a command starts; a Ctrl-C
    while torch and the commands still import exits 130 without a traceback.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        from batchlab.cli import main as cli_main
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    cli_main()


if __name__ == "__main__":
    main()
