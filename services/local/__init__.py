"""Local process management, the one launcher: the Kafka broker's jars and JVM (:mod:`services.local.broker`),
daemons with pidfiles, logs and readiness waits (:mod:`services.local.daemon`), the whole stack that
``flywheel run`` starts (:mod:`services.local.stack`) and the checks before it does (:mod:`services.local.preflight`).
``flywheel run``, the benchmarks and the tests all start servers through it. Kafka itself (topics, events, the
stream app) is ``streams``' business; this package only runs processes on this machine.
"""
