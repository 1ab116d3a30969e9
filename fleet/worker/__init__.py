"""Farm hosts: per-device tasks run by ``fleet worker`` on the host that reaches a device.

A device record names the farm host that reaches it (``devices.via``). With a broker
configured (``FLEET_BROKER`` or ``broker.url`` in ``$FLEET_HOME/config.toml``), the
fan-out (:func:`fleet.rollout.fanout.call_each`) sends each such device's task to that
host's Celery queue ``fleet.host.<NAME>`` (Redis as broker and result backend); the worker
there runs the very same task through the same fan-out for one device and writes step
events to the shared registry. Modules:

- :mod:`~fleet.worker.settings`: broker URL, deadlines and the visibility timeout derived
  from them, the artifact location (no Celery import);
- :mod:`~fleet.worker.app`: the Celery application (acks late, reject on worker lost);
- :mod:`~fleet.worker.wire`: a device's outcome as JSON and back;
- :mod:`~fleet.worker.roster`: the ``workers`` table (heartbeats, liveness);
- :mod:`~fleet.worker.broker`: sending, polling, revoking (the controller's view of Celery);
- :mod:`~fleet.worker.dispatch`: the Celery dispatcher behind the fan-out's seam;
- :mod:`~fleet.worker.tasks`: the task kinds a worker runs (deploy, rollback, audit,
  lora, enroll) and the Celery task that runs one;
- :mod:`~fleet.worker.progress`: pushes' bytes, reported to the controller's display;
- :mod:`~fleet.worker.runner`: ``fleet worker --host NAME``;
- :mod:`~fleet.worker.artifacts`: packages through the shared artifact location, or
  fetched over HTTP(S) with Range into the worker's cache (``artifacts.url``).
"""
