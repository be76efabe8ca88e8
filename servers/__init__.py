"""hydrabrain MCP servers and the `hydrabrain` command."""
