"""A small external MCP server for the router's aggregation tests, run over stdio or streamable HTTP.

    python echo_server.py stdio
    python echo_server.py http PORT

It can echo, add, report progress, log, hang and crash on demand, and has a resource, a template
and a prompt, so every kind of forwarding is exercised.
"""

from __future__ import annotations

import os
import sys
import warnings

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver import Context

server = MCPServer(name="echo", instructions="Echoes things for tests.", log_level="WARNING")
NAME = os.environ.get("ECHO_NAME", "echo")


@server.tool()
async def echo(text: str) -> str:
    """Return the text."""
    return f"{NAME}: {text}"


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def getenv(name: str) -> str:
    """An environment variable of the server process, or 'unset'."""
    return os.environ.get(name, "unset")


@server.tool()
def pid() -> int:
    """The server's process id."""
    return os.getpid()


@server.tool()
async def count(n: int, ctx: Context) -> str:
    """Report progress n times, logging each step."""
    for i in range(1, n + 1):
        await ctx.report_progress(i, n, f"step {i}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            await ctx.info(f"did step {i}")
    return f"counted to {n}"


@server.tool()
async def sleep(seconds: float, marker: str | None = None) -> str:
    """Sleep, then answer (a hang when the seconds outlast the caller's patience); note a cancellation in `marker`."""
    try:
        await anyio.sleep(seconds)
    except anyio.get_cancelled_exc_class():
        if marker:
            with open(marker, "w") as fh:
                fh.write("cancelled")
        raise
    return "slept"


@server.tool()
def crash() -> str:
    """End the process at once, as a crash would."""
    os._exit(3)


@server.resource("echo://info")
def info() -> str:
    """Static information."""
    return "echo server info"


@server.resource("echo://item/{item_id}")
def item(item_id: str) -> str:
    """One item by id."""
    return f"item {item_id}"


@server.prompt()
def greet(name: str) -> str:
    """A greeting prompt."""
    return f"Say hello to {name}."


if __name__ == "__main__":
    if sys.argv[1] == "stdio":
        server.run("stdio")
    else:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
