"""The state kept in Redis: the pipelined link, idempotency records, links, the queue, the breaker, the rate
limits, the request log, sealing at rest, and the embedded Redis."""
