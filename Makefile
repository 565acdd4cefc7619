# The two commands of the README. Both set up .venv first (idempotent).
.PHONY: setup demo test

setup:
	./scripts/setup.sh

demo: setup
	FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 .venv/bin/python examples/federated-hospitals/run.py

test: setup
	FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 .venv/bin/python -m pytest -q
