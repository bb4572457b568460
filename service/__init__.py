"""maskd's job service: the REST API, its settings and the SQL store."""
