"""Run configurations: `get_config()` files for ml_collections config flags."""
