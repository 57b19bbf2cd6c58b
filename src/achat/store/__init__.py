"""Message storage behind one small interface (:class:`achat.store.base.Store`)."""
