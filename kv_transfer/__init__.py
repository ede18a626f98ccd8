"""pdserve.kv_transfer: moving KV blocks from prefill caches into decode caches."""
