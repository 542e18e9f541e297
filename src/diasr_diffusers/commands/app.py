"""``diasr app``: the Gradio page (:mod:`diasr_diffusers.app`) on the embedded sprite model or a ``--model``."""

from __future__ import annotations

import argparse
import errno

from ..pipelines.loading import UsageError
from . import DefaultsHelpFormatter
from .generate import report_usage_error


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 1..65535, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    app = subparsers.add_parser(
        "app",
        help="a web page for multi-subject generation (Gradio; needs the [app] extra)",
        description=(
            "Serve a Gradio page: prompt, subjects (phrase + reference images, layout masks drawn on a canvas), "
            "routing mode, sizes; the result shows the video, the routing-map overlay and the routing shares. "
            "Without --model it runs the embedded sprite model (offline, CPU, seconds). On a remote GPU server: "
            "run it there and open it through `ssh -L 7860:localhost:7860 SERVER` at http://localhost:7860."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    app.add_argument(
        "--model",
        default=None,
        help="Diffusers checkpoint (DiasR, or stock Wan, LTX-Video, CogVideoX, HunyuanVideo-1.5): local folder or Hub "
        "repo id (default: the embedded sprite model)",
    )
    app.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes the page to the network)"
    )
    app.add_argument("--port", type=_port, default=7860, help="port to listen on")
    app.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cuda if available, else cpu)")
    app.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 on CUDA, float32 on CPU",
    )
    app.set_defaults(func=run_app)


def run_app(args: argparse.Namespace) -> int:
    try:
        return _app(args)
    except UsageError as err:
        return report_usage_error("app", err)


def _app(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UsageError('the page needs Gradio: pip install "diasr-diffusers[app]"') from None
    _check_listen(args.host, args.port)  # before the model loads: a taken port is reported at once

    from ..app import AppSettings, build_app
    from ..pipelines.loading import load_pipeline, resolve_checkpoint
    from .generate import check_device, check_family_supports_generate, resolve_dtype

    device = check_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.model is None:
        from ..utils.toy import load_sprite_model, sprite_model_path

        folder, settings = sprite_model_path(), AppSettings.for_sprite_model()
        pipe = load_sprite_model(dtype=dtype)
    else:
        folder = resolve_checkpoint(args.model, "--model")
        check_family_supports_generate(folder, args.model)  # by name, before the weights load
        pipe = load_pipeline(folder, dtype=dtype)
        settings = AppSettings.for_pipeline(pipe)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    demo = build_app(pipe, settings, checkpoint=folder)
    try:
        demo.launch(
            server_name=args.host,
            server_port=args.port,
            share=False,
            show_error=False,
            quiet=True,
            prevent_thread_lock=True,
        )
    except OSError:  # taken since the check above
        raise UsageError(f"--port {args.port} on {args.host} is taken; pick another --port") from None
    print(f"diasr app: serving http://{args.host}:{args.port}/ (Ctrl+C to stop)", flush=True)
    demo.block_thread()
    return 0


def _check_listen(host: str, port: int) -> None:
    """``host:port`` can be listened on: an address of this machine, and the port free."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise UsageError(f"--host {host!r} is not an address or host name this machine can resolve") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise UsageError(f"--port {port} on {host} is taken; pick another --port") from None
            raise UsageError(
                f"--host {host}: cannot listen there ({err.strerror}); e.g. 127.0.0.1 or 0.0.0.0"
            ) from None
