"""HTTP routes: each parses its input, calls one service-layer method and returns a schema."""
