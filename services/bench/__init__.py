"""The tools that drive Flywheel from outside, as users and operators do, and measure it: one module per
benchmark (``flywheel bench api|models|loop|flywheel|hostile|campaign|abuse``), the harness that starts a
throwaway stack and talks to it over HTTP, spamd and Kafka (:mod:`services.bench.harness`,
:mod:`services.bench.api_process`), the replay that is ``make run``'s main job (:mod:`services.bench.replay`),
and the checks that every dashboard and alert query returns data (:mod:`services.bench.observability`).

Nothing in the serving processes (``services.api``, ``services.worker``, ``services.spamd``) imports this
package (``tests/test_layers.py`` keeps it so).
"""
