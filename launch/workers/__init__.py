"""Small scripts the launchers' tests (and users checking a cluster) run on every rank."""
