"""The gateway: engine thread, gRPC dispatcher to expert shards, the client APIs."""
