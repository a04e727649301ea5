"""The one error type that names its field, importable from every layer (no torch, no imports).

A ``FieldError`` carries the bad field in ``.field`` and the explanation in ``.message``; its text
reads ``"<field>: <message>"``. The CLI turns it into ``error: <field>: <message>`` (exit 2) from the
attributes, never by parsing the text. ``SpecError`` and ``StoreError`` are its subclasses.

>>> err = FieldError("lr", "must be > 0, got -1")
>>> err.field, err.message, str(err)
('lr', 'must be > 0, got -1', 'lr: must be > 0, got -1')
>>> isinstance(err, ValueError)
True
"""

from __future__ import annotations


class FieldError(ValueError):
    """A bad value of one named field: ``field`` says which, ``message`` what is wrong and allowed."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        """Pickle by field and message (errors cross process boundaries in sweeps)."""
        return type(self), (self.field, self.message)
