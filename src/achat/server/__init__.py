"""The achat server: a registry that owns state, sessions that drive sockets, and the app."""
