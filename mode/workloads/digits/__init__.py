"""The built-in ``digits`` benchmark: a tiny unified model pretrained on scikit-learn's digits
(``model``), its vocabulary and tasks (``data``), and the trainer's workload (``workload``)."""
