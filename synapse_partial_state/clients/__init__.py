"""What clients see and can do while a room is partial (MSC2775's client side).

* :mod:`.syncing`: the ``org.matrix.msc2775.syncing`` signal in ``/sync`` (which
  room objects carry it, and its value), reached through :mod:`..compat.sync`;
* :mod:`.endpoint`: ``GET /_matrix/client/unstable/org.matrix.msc2775/rooms/
  {roomId}/partial_state``, the resync's progress for a member of the room,
  mounted by :func:`..compat.web.mount_client_api`.
"""
