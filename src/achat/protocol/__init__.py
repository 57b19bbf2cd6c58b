"""The pure protocol core: framing, typed messages and naming rules. No I/O here."""
