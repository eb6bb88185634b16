"""Operating a fleet: the metrics edgeray exports, its Grafana dashboards and Prometheus alert rules, and
``edgeray monitor`` which runs Prometheus (and Grafana, where installed) against a local cluster.

- :mod:`edgeray.monitoring.catalogue`: every metric edgeray exports (name, kind, labels, meaning). Training
  runs (pipeline, sync strategies, MoE, federated), the fabric's transfers and the serving app record them
  through ``ray.util.metrics``; Ray serves them, prefixed ``ray_``, on each node's metrics export port.
- :mod:`edgeray.monitoring.export`: :class:`~edgeray.monitoring.export.TrainMetrics`, what a training driver
  calls per step.
- :mod:`edgeray.monitoring.dashboards`: the dashboards and alert rules, generated from Python into
  ``edgeray/monitoring/generated/`` (``python -m edgeray.monitoring.dashboards --write``; a test checks the
  files are what the generator makes, so nobody edits them by hand).
- :mod:`edgeray.monitoring.monitor`: Prometheus's configuration for a cluster, starting and stopping it,
  and ``check``: every dashboard panel's query run against Prometheus, reporting which have data.
"""
