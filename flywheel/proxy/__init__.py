"""The capture proxy and the traffic it records.

`server.py` is `flywheel proxy`: an OpenAI-compatible recording proxy (the local `store: true`);
`captures.py` lists what it recorded and exports it as SFT JSONL (`flywheel captures`).
"""

from flywheel.capture_rows import parse_metadata_filters, parse_when
from flywheel.proxy.captures import export_sft, list_captures, print_captures, sft_example
from flywheel.proxy.server import CaptureWriter, StreamAssembler, create_proxy_app, normalise_upstream, run_proxy

__all__ = ["CaptureWriter", "StreamAssembler", "create_proxy_app", "export_sft", "list_captures",
           "normalise_upstream", "parse_metadata_filters", "parse_when", "print_captures", "run_proxy", "sft_example"]
