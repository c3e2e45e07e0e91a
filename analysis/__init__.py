"""DuckDB views and queries over the results store. Imports no torch and no worker code."""
