"""The Debian packages the project's services and tests use, installed with apt-get when missing
(and we run as root): redis-server, prometheus + promtool, chromium + chromedriver.

Standard library only, like services.py beside it, which re-exports these.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

logger = logging.getLogger(__name__)


def _apt_install(package: str, *commands: str) -> list[str]:
    """The paths of ``commands``, installing the Debian ``package`` first if one is missing (as root)."""
    if all(shutil.which(c) for c in commands):
        return [shutil.which(c) for c in commands]
    if os.geteuid() != 0:
        raise SystemExit(f"{package} is not installed; run `sudo apt-get install -y {package}` first")
    logger.info("installing %s with apt-get", package)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        if subprocess.run(["apt-get", "install", "-y", "-q", package], env=env).returncode != 0:
            # A fresh image may have no package lists yet.
            subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
            subprocess.run(["apt-get", "install", "-y", "-q", package], env=env, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"could not install {package} with apt-get: {exc}") from exc
    missing = [c for c in commands if not shutil.which(c)]
    if missing:
        raise SystemExit(f"apt-get installed {package} but {', '.join(missing)} is not on PATH")
    return [shutil.which(c) for c in commands]


def ensure_redis_server() -> str:
    return _apt_install("redis-server", "redis-server")[0]


def ensure_prometheus() -> tuple[str, str]:
    """(prometheus, promtool) from Debian's `prometheus` package: the tests check expositions, rules
    and config with promtool and run a real server against serve and the learner."""
    prometheus, promtool = _apt_install("prometheus", "prometheus", "promtool")
    return prometheus, promtool


EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")


def ensure_chromium() -> tuple[str, str]:
    """(chromium, chromedriver) from Debian's `chromium-driver` package (it pulls `chromium`), for
    the chat page's browser tests. Also the colour emoji font when we may install it, so that the
    👍 / 👎 buttons render in screenshots (without it they are empty boxes; the tests pass anyway)."""
    chromium, chromedriver = _apt_install("chromium-driver", "chromium", "chromedriver")
    if not EMOJI_FONT.exists() and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(["apt-get", "install", "-y", "-q", "fonts-noto-color-emoji"], env=env).returncode != 0:
            logger.warning("could not install fonts-noto-color-emoji: emoji will not render in screenshots")
    return chromium, chromedriver
