"""Typed exceptions shared by every EMMA package.

Library code raises these; the CLI turns them into a one-line message and a non-zero exit, the server
into a 4xx JSON body. Messages never contain PHI (no names, IDs or dates from a file), only paths,
tag keywords and numbers.
"""

from __future__ import annotations


class EmmaError(Exception):
    """Base of every error EMMA raises on purpose."""


class InputError(EmmaError):
    """The input is unusable as given (a user-facing problem, not a bug)."""


class CorruptFileError(InputError):
    """Truncated, corrupt or unrecognised file."""


class NoPixelDataError(InputError):
    """A DICOM file without pixel data (structured report, presentation state, ...)."""


class UnsupportedTransferSyntaxError(InputError):
    """Compressed pixel data that no installed decoder can handle."""


class ImageTooLargeError(InputError):
    """An image, frame count or file size over the configured bound (decompression-bomb guard)."""


class SeriesError(InputError):
    """A DICOM series that cannot be made into one consistent volume."""


class MixedSeriesError(SeriesError):
    """A folder holding several series where exactly one was expected."""


class DataFormatError(InputError):
    """A dataset folder or record that does not match the expected layout or schema."""


class OutputError(EmmaError):
    """An output that cannot be written where asked (permissions, a file in the way, a full disk)."""


def require_at_least(name: str, value: float, minimum: float) -> None:
    """Raise ValueError (a caller's mistake, not bad input) unless ``value >= minimum``."""
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
