"""The retraining worker: users' flags -> consensus labels -> challengers -> gate -> promotion.

``store`` keeps votes, labels and offsets durable (one SQLite transaction per batch of records); ``learner``
runs the two training clocks and the gate; ``app`` is the process (faust wiring, metrics page, signals).
The statistics and rules of belief it applies are pure code in ``models`` (consensus, learning, gate).
"""
