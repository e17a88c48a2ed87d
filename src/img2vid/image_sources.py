"""Image files in: read a path or an http(s) URL whole and decode it with Pillow, every failure a one-line
`InputError` naming the source. `img2vid.images.load_image` and diffusers' stand-in `img2vid.utils.load_image`
both read files through here.
"""

from __future__ import annotations

import http.client
import io
import os
import urllib.error
import urllib.parse
import urllib.request

import PIL.Image

from img2vid.errors import InputError, user_path

__all__ = ["URL_TIMEOUT_S", "MAX_IMAGE_BYTES", "is_url", "fetch_url", "open_decoded", "open_source"]

URL_TIMEOUT_S = 30.0
# The largest image file or download read: far past any photo (a 16-bit 16384^2 RGB TIFF is 1.6 GB uncompressed, and
# pixel counts that large are refused after decoding anyway), yet a bound on a file that never ends (a device such as
# /dev/zero, or a server that streams without end), which would otherwise be read until memory runs out.
MAX_IMAGE_BYTES = 2 << 30


def is_url(source: object) -> bool:
    """Whether `source` names an http(s) URL (anything else that is a str is a path)."""
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


def fetch_url(url: str, timeout: float = URL_TIMEOUT_S) -> bytes:
    """Download `url` with the stdlib (no `requests` dependency); any failure becomes a one-line InputError."""
    # Spaces and other characters a browser would escape, escaped as `requests` (diffusers' loader) does
    quoted = urllib.parse.quote(url, safe=":/?#[]@!$&'()*+,;=%~")
    try:
        request = urllib.request.Request(quoted, headers={"User-Agent": "img2vid"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(MAX_IMAGE_BYTES + 1)
    except urllib.error.HTTPError as e:
        raise InputError(f"could not download {url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise InputError(f"could not download {url}: {e.reason}") from None
    except (TimeoutError, OSError, ValueError, http.client.HTTPException) as e:  # a cut download: IncompleteRead
        raise InputError(f"could not download {url}: {type(e).__name__}: {e}") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise InputError(f"{url} sends more than {MAX_IMAGE_BYTES >> 30} GiB: too large for an image")
    return data


def open_decoded(fp: io.BytesIO, name: str) -> PIL.Image.Image:
    """Open and fully decode an image file; Pillow is lazy, so `.load()` is what surfaces truncated data."""
    try:
        image = PIL.Image.open(fp)
    except PIL.UnidentifiedImageError:
        raise InputError(f"{name} is not an image (or not a format Pillow can read)") from None
    except PIL.Image.DecompressionBombError as e:
        raise InputError(f"{name} is too large to decode safely: {e}") from None
    except PermissionError:
        raise InputError(f"{name} cannot be read (permission denied)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{name} cannot be read as an image: {e}") from None
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"{name} is truncated or corrupt: {e}") from None
    return image


def open_source(source: str | os.PathLike) -> tuple[PIL.Image.Image, str]:
    """A path (~ expanded) or http(s) URL -> (its image, fully decoded; the name to show in messages)."""
    if is_url(source):
        url = str(source)
        data = fetch_url(url)
        if not data:
            raise InputError(f"{url} returned an empty response, not an image")
        return open_decoded(io.BytesIO(data), url), url
    path = user_path(source)
    name = str(path)
    if not path.exists():
        raise InputError(f"image file not found: {name}")
    if path.is_dir():
        raise InputError(f"{name} is a directory, not an image file")
    if not path.is_file():  # reading a pipe waits for a writer forever, a device such as /dev/zero never ends
        raise InputError(f"{name} is not a regular file (a pipe, socket or device), not an image file")
    try:
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise InputError(f"{name} is over {MAX_IMAGE_BYTES >> 30} GiB: too large for an image file")
        # Read it whole: images are small, and no file handle stays open behind a lazily decoded image.
        data = path.read_bytes()
    except PermissionError:
        raise InputError(f"{name} cannot be read (permission denied)") from None
    except OSError as e:
        raise InputError(f"{name} cannot be read: {e.strerror or e}") from None
    if not data:
        raise InputError(f"{name} is an empty file, not an image")
    return open_decoded(io.BytesIO(data), name), name
