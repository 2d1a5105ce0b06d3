"""Watching the fleet over HTTP (`hwledger fleet serve --http`): the Prometheus exporter (`metrics`), the status
page (`page`), the JSON API (`api`) and the server that serves them beside the tick loop (`http`)."""
