"""Tasks: what a task reads, which model class it loads, its losses, metric and direction."""
