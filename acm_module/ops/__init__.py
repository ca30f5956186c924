"""Operations: Prometheus metrics, structured logs, replay and what-if tuning."""
