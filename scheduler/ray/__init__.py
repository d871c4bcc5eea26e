"""The Ray orchestration: start or join Ray, create/find/revive worker actors, drive each request
through them (retry, resubmit), prefill groups."""
