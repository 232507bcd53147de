"""Message framing shared by the request and response parsers (sans-IO): the head's
lines and token characters, the ``Content-Length`` rules and the chunked transfer coding.

For chunked bodies, the parser that owns the connection's buffer calls :meth:`ChunkedReader.read` whenever bytes
arrive; the reader consumes what it can (body bytes go to the parser through ``take``) and
says whether the body, trailers included, is complete. What differs between the two sides
(error wording, status hints, how trailers are validated, a body limit) is a parameter.
"""

from __future__ import annotations

from collections.abc import Callable

from supervisor.http.errors import RemoteProtocolError

__all__ = [
    "HEXDIG",
    "MAX_LENGTH_DIGITS",
    "TCHAR",
    "ChunkedReader",
    "find_blank_line",
    "merge_content_length",
    "split_head",
]

HEXDIG = b"0123456789abcdefABCDEF"
_MAX_CHUNK_LINE = 4096
MAX_LENGTH_DIGITS = 20
# bytes.translate(None, delete=X) removes every byte in X: what is left are the bad bytes.
TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Bytes allowed anywhere in a head once CRLF became LF: h11's rule (no NUL, no whitespace
# other than SP and HTAB, no bare CR); other control bytes are tolerated, as h11 does.
_HEAD_BYTES = bytes(b for b in range(256) if b not in (0x00, 0x0B, 0x0C, 0x0D))

_SIZE = 0
_DATA = 1
_CRLF = 2
_TRAILERS = 3


Bad = Callable[[str, int], RemoteProtocolError]


def merge_content_length(
    previous: bytes | None, value: bytes, *, who: str, bad: Bad
) -> bytes | None:
    """Validate one ``Content-Length`` field against those seen before (h11's rules).

    A list of equal values (``5, 5``) counts as one. Returns the value to keep, or ``None``
    when it repeats ``previous`` exactly (keep one, as h11 does).
    """
    if b"," in value:
        lengths = {length.strip() for length in value.split(b",")}
        if len(lengths) != 1:
            raise bad(f"{who} has conflicting Content-Length values: {value!r}.", 400)
        value = lengths.pop()
    if not value.isdigit() or len(value) > MAX_LENGTH_DIGITS:
        raise bad(f"{who} has an invalid Content-Length: {value[:30]!r}.", 400)
    if previous is None:
        return value
    if previous != value:
        raise bad(f"{who} has conflicting Content-Length headers.", 400)
    return None


def find_blank_line(buf: bytearray, start: int) -> tuple[int, int]:
    """``(end of text incl. its last LF, end of blank line)`` or ``(-1, -1)``; h11's rule."""
    crlf = buf.find(b"\n\r\n", start)
    lf = buf.find(b"\n\n", start, crlf + 1 if crlf >= 0 else len(buf))
    if lf >= 0:
        return lf + 1, lf + 2
    if crlf >= 0:
        return crlf + 1, crlf + 3
    return -1, -1


class ChunkedReader:
    """One chunked body at a time; :meth:`reset` before the next message's body."""

    __slots__ = (
        "_bad",
        "_check_trailers",
        "_eof_message",
        "_max_body",
        "_max_head",
        "_remaining",
        "_scan",
        "_state",
        "_total",
        "_trailer_status",
        "_who",
    )

    def __init__(
        self,
        *,
        who: str,
        bad: Bad,
        check_trailers: Callable[[bytes], None],
        eof_message: str,
        max_head: int,
        max_body: int | None = None,
        trailer_status: int = 400,
    ) -> None:
        self._who = who  # "Request" or "Response", for messages
        self._bad = bad
        self._check_trailers = check_trailers
        self._eof_message = eof_message
        self._max_head = max_head
        self._max_body = max_body
        self._trailer_status = trailer_status
        self.reset()

    def reset(self) -> None:
        self._state = _SIZE
        self._remaining = 0
        self._scan = 0
        self._total = 0

    def read(self, buf: bytearray, take: Callable[[int], None], eof: bool) -> bool:
        """Consume from ``buf``; ``take(n)`` moves ``n`` body bytes out. True when complete."""
        bad = self._bad
        while True:
            state = self._state
            if state == _DATA:
                n = min(self._remaining, len(buf))
                if n:
                    take(n)
                    self._remaining -= n
                if self._remaining:
                    break
                self._state = _CRLF
            elif state == _CRLF:
                if buf[:2] != b"\r\n"[: len(buf)]:
                    raise bad(f"{self._who} has a malformed chunk end: {bytes(buf[:2])!r}.", 400)
                if len(buf) < 2:
                    break
                del buf[:2]
                self._state = _SIZE
            elif state == _SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > _MAX_CHUNK_LINE:
                        raise bad(f"{self._who} has a chunk header longer than 4096 bytes.", 400)
                    break
                line = bytes(buf[:end])
                del buf[: end + 2]
                # RFC 9112 7.1.1 allows white space (BWS) before a chunk extension's ";";
                # h11 refuses it, but workers that send "6 ;ext" are legal.
                size = line.partition(b";")[0].rstrip(b" \t")
                if (
                    not size
                    or len(size) > MAX_LENGTH_DIGITS
                    or size.translate(None, HEXDIG)
                    or b"\n" in line
                ):
                    raise bad(f"{self._who} has an illegal chunk header: {line[:100]!r}.", 400)
                self._remaining = int(size, 16)
                self._total += self._remaining
                if self._max_body is not None and self._total > self._max_body:
                    raise bad(f"{self._who} body is larger than {self._max_body} bytes.", 413)
                self._state = _DATA if self._remaining else _TRAILERS
            else:  # _TRAILERS
                if buf[:1] == b"\n" or buf[:2] == b"\r\n":
                    del buf[: 1 if buf[0] == 0x0A else 2]
                    return True
                if buf[:1] == b"\r" and len(buf) == 1:
                    break
                text_end, end = find_blank_line(buf, self._scan)
                if end < 0 or text_end > self._max_head:
                    if len(buf) > self._max_head:
                        raise bad(
                            f"{self._who} trailers are larger than {self._max_head} bytes.",
                            self._trailer_status,
                        )
                    self._scan = max(0, len(buf) - 2)
                    break
                text = bytes(buf[:text_end])
                del buf[:end]
                self._scan = 0
                self._check_trailers(text)  # validated, then dropped
                return True
        if eof:
            raise bad(self._eof_message, 400)
        return False


def split_head(text: bytes, subject: str = "Response") -> list[bytes]:
    """Lines of a block ending in LF (CRLF allowed), without the final empty one; unfolded.

    ``subject`` ("Request" or "Response") starts the error messages.
    """
    if b"\r" in text:
        text = text.replace(b"\r\n", b"\n")
    if text.translate(None, _HEAD_BYTES):
        raise RemoteProtocolError(
            f"{subject} head contains a forbidden control byte (NUL, CR, VT or FF)."
        )
    lines = text.split(b"\n")
    lines.pop()
    if b"\n " in text or b"\n\t" in text:
        lines[1:] = _unfold(lines[1:], subject)
    return lines


def _unfold(lines: list[bytes], subject: str = "Response") -> list[bytes]:
    """Join obsolete folded lines (RFC 9112 §5.2) to their field with a single space."""
    out: list[bytes] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not out:
                raise RemoteProtocolError(
                    f"{subject} header block starts with a continuation line."
                )
            out[-1] = out[-1] + b" " + line.lstrip(b" \t")
        else:
            out.append(line)
    return out
