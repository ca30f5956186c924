"""The REST API (/api/v1, described at /openapi.json) and the fraud team's web console, served by
`acm serve` as a process of the pool (`web_http`)."""
