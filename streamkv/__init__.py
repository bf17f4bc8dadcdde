"""streamkv: reproducible KV-cache eviction experiments."""
