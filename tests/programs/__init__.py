"""Real programs driven under `safechroma run` (a package, so its helpers import relatively)."""
