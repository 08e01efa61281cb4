"""The fault campaign (``scripts-dev/faults/run``): resyncs under injected faults.

Each run joins a fresh fake room from a fresh homeserver with the module, injects
one fault at a random moment of the resync, heals it, and checks the invariants the
resync engine promises (see ``README.md`` here). Importable as ``faults`` with
``scripts-dev`` and the repository root on ``sys.path`` (the entry point arranges
that; ``tests/blackbox/test_faults.py`` too).

* ``plan``: what each run does (kind, database, seed, room size);
* ``context``: one live run (peer, joiner, users, random moments, its record);
* ``kinds``: the fault kinds, one function each;
* ``traffic``: messages from remote and local users during the resync;
* ``invariants``: the checks after each run, one function each;
* ``runner``: one run from start to verdict;
* ``campaign``: runs in sequence, records and logs;
* ``report``: the table and the JSON;
* ``cli``: the command line.
"""
