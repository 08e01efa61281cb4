"""A fake federation peer: one process pretending to be many Matrix homeservers.

Run it with ``python -m tests.fedkit.fakepeer --workdir DIR --ca-dir CADIR`` and
drive it over its plain-HTTP JSON control API, or use the synchronous wrapper
:class:`tests.fedkit.fakepeer.control_client.FakePeer`.

Modules:

* ``keys``: per-server ed25519 signing keys and key-server responses.
* ``notary``: every fake server as a notary (``/_matrix/key/v2/query``), and a
  dedicated notary for a homeserver's ``trusted_key_servers``.
* ``signing``: X-Matrix request signing/parsing and event hashing/signing.
* ``rooms``: the in-memory room DAG and state tracking.
* ``synth``: the fast synthetic room builder.
* ``server``: one fake server's TLS listener.
* ``behaviour``: misbehaviour rules (delay, error, hang, drop, bad signatures,
  omissions, holds, and the broken answers below).
* ``badanswers``: answers trickled, cut short or malformed.
* ``httpclient``: outgoing signed federation requests over verified TLS.
* ``fedapi``: the federation endpoints every fake server listener serves.
* ``peer``: the process-wide state tying servers, rooms and logs together.
* ``incoming``: request handling (logging, misbehaviour, verification) for fake servers.
* ``joiner``: acting as a joining server against a real homeserver.
* ``errors``: control API errors.
* ``control``: the control API.
* ``control_client``: the synchronous test-side wrapper (process and control API).

Importing this package has no side effects (in particular it does not install a
Twisted reactor).
"""
