"""The DDL persistd applies at start, shipped inside the wheel as the package `persistd.sql`
(pyproject.toml maps this directory there) and read with importlib.resources."""
