"""Certificate tooling (certificates themselves are generated, never committed)."""
