"""Device lists during a resync: the module's durable replay queues.

Outgoing: every device-list change of a local user in a partial-state room is
queued per room with the servers it reached, and replayed at completion to the
servers the full state shows that have not had it (:mod:`.outgoing`). The queues
live in the module's own tables (:mod:`.store`).
"""
