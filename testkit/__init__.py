"""What tests and benchmarks need to drive the system, in one place; not part of the wheel.

- ``testkit.waiting``: ``wait_for``, the one way to wait until something holds.
- ``testkit.ports``: ``free_port``.
- ``testkit.processes``: ``kto-loop`` commands (and other servers) as child processes, each in its
  own process group with its output in a log file; waiting until they are ready; stopping them.
- ``testkit.background_server``: the server in a thread of the current process.

Nothing is imported here: ``testkit.background_server`` loads the whole server, which a test of
the bus alone should not pay for.
"""
