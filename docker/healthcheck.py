"""Docker HEALTHCHECK of care-serve: exit 0 when GET /readyz on this container answers 200, else 1.

Python rather than curl because slim images have no curl. The port is CARE_PORT (the image sets 8000); change the
server's port with CARE_PORT, not with --port, so that this check follows it.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 4.0


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('CARE_PORT', '8000')}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            status = int(response.status)
    except urllib.error.HTTPError as error:  # 503 while loading
        status = error.code
    except OSError as error:  # refused, timed out: not up yet
        sys.stderr.write(f"{url}: {error}\n")
        return 1
    if status != 200:
        sys.stderr.write(f"{url}: HTTP {status}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
