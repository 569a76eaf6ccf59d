"""HTTP and websocket front of the service: routes, middlewares, rendering."""
