"""Secrets kept out of every message: SDK and HTTP errors may echo a key, a token or a signed
URL, and selm's errors quote them. `scrub` is applied to every object-store error text."""

from __future__ import annotations

import os
import re
from urllib.parse import quote

# Names of variables whose values are secrets: AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
# AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_TOKEN, AZURE_CLIENT_SECRET, GOOGLE_BEARER_TOKEN,
# GOOGLE_SERVICE_ACCOUNT_KEY (a whole key file as JSON), HF_TOKEN, ...
_SECRET_NAMES = ("SECRET", "TOKEN", "KEY", "PASSWORD", "SAS", "CREDENTIAL")
# A SAS signature or token in a URL an SDK echoes, whatever variable (or file) it came from
_URL_SECRETS = re.compile(r"((?:^|[?&\s])(?:sig|se|skoid|sktid|token|access_token|"
                          r"X-Amz-Signature|X-Amz-Security-Token|X-Goog-Signature)=)[^&\s\"']+",
                          re.IGNORECASE)


def scrub(message: str) -> str:
    """An error text without any credential the environment holds (SDK errors may echo them,
    as given or URL-encoded), nor a signature or token in a URL."""
    for name, value in os.environ.items():
        if not value or len(value) < 8 or not any(k in name.upper() for k in _SECRET_NAMES):
            continue
        for form in {value, value.lstrip("?"), quote(value, safe=""), quote(value, safe="=&")}:
            if len(form) >= 8:
                message = message.replace(form, "***")
    return _URL_SECRETS.sub(r"\1***", message)


__all__ = ["scrub"]
