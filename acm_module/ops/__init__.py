"""Operations: the Prometheus metrics sidecar, replay of recorded traffic and what-if tuning."""
