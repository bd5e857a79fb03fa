"""Expert shards: the gRPC server over an ExpertStore and its Serve deployment."""
