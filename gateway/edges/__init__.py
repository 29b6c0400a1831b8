"""The edges that take requests in: the HTTP server protocol and its options, MLLP, who may call (SMART,
mutual TLS), the OpenAPI document; the routers of each edge."""
