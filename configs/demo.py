"""The demo config (`jaxser demo`, `make demo`): a small Whisper-style encoder learning
emotion distributions from the built-in synthetic corpus. It lives in the package
(`jaxser/configs/demo.py`) so an installed `jaxser demo` finds it; this file is it for
`jaxser train --config configs/demo.py[:smoke]`.
"""

from jaxser.configs.demo import get_config

__all__ = ["get_config"]
