"""Starting the browser app: the extra's presence, the exposure warning, and serving."""
from __future__ import annotations

from typing import Any

from difffeat.errors import DiffFeatError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def check_gradio() -> None:
    """Raise one line when the ``[explore]`` extra is not installed."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise DiffFeatError('difffeat explore needs the browser extra: pip install "difffeat[explore]"') from None


def exposure_warning(host: str, share: bool) -> str | None:
    """The warning printed when the app is reachable beyond this machine (None when local)."""
    if share:
        return ("warning: --share opens a public gradio.live link to this app: anyone with the URL can run the "
                "model and read uploads")
    if host not in LOCAL_HOSTS:
        return (f"warning: --host {host} serves the app to every machine that can reach this one "
                "(no authentication); the default 127.0.0.1 keeps it local")
    return None


def serve(session: Any, host: str, port: int, share: bool) -> None:
    """Build the app on ``session`` and serve it (blocking); a port that is taken is one line."""
    from .app import build_app, theme

    app = build_app(session)
    app.queue(default_concurrency_limit=1)
    try:
        app.launch(server_name=host, server_port=port, share=share, quiet=False, show_error=False, ssr_mode=False,
                   max_file_size="64mb", theme=theme(), footer_links=[])
    except OSError as e:  # port taken, address not local
        raise DiffFeatError(f"cannot serve on {host}:{port}: {str(e).splitlines()[0]}; choose another --port") from None
