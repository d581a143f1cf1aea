"""How ranks share the work: rank facts for the one run path, DDP settings, FSDP2 sharding of the 4-bit experts."""
