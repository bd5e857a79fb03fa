"""The controller: shard registry, placement versions, rebalancing and autoscaling policy."""
