"""What the whole cluster shares: Ray bootstrap, process groups, the shared prefix cache."""
