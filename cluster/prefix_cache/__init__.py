"""The shared prefix cache: chained block keys, the block codec, the store interface with its
Redis implementation, and the cache that moves K/V blocks between an engine and the store."""
