"""Tables -> matplotlib figures -> one self-contained HTML page."""
