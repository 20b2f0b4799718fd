"""Calling the cloud: error codes, BakeErrors a person can act on (never showing a
secret), and retries with exponential backoff for what is worth retrying."""

from __future__ import annotations

import logging
from typing import Any, Callable, Protocol

from botocore.exceptions import BotoCoreError, ClientError, ConnectionError as BotoConnectionError, HTTPClientError

from builder.core.errors import BakeError
from .credentials import Credentials, mask

log = logging.getLogger("bake.cloud")

AUTH_CODES = {"SignatureDoesNotMatch", "AuthFailure", "InvalidAccessKeyId", "InvalidClientTokenId",
              "AccessDenied", "MissingAuthenticationToken", "UnrecognizedClientException", "403", "Forbidden"}
RETRY_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "500", "502", "503", "504"}
CLOCK_CODES = {"RequestTimeTooSkewed", "RequestExpired"}
MISSING_CODES = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}


class RetryPolicy(Protocol):
    """How often and how patiently a failed call is tried again. Read only: the options
    and the stores' frozen settings that carry these fields all fit it."""

    @property
    def attempts(self) -> int: ...

    @property
    def backoff(self) -> float: ...   # first delay, doubled after each failure (at most 60 s)

    @property
    def sleep(self) -> Callable[[float], None]: ...


def error_code(e: ClientError) -> str:
    """The error code of a failed call, or its HTTP status when the reply had no body (HEAD)."""
    return str(e.response.get("Error", {}).get("Code") or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))


def cloud_error(e: Exception, what: str, creds: Credentials) -> BakeError:
    """A BakeError for a failed cloud call, naming the call and never a secret."""
    if isinstance(e, ClientError):
        code = error_code(e)
        msg = e.response.get("Error", {}).get("Message") or ""
        if code in CLOCK_CODES:
            return BakeError(f"{what}: the cloud refused the request's time ({code}); this machine's clock and "
                             "the cloud's differ by more than 15 minutes: set the clock (NTP) and try again")
        if code in AUTH_CODES:
            return BakeError(
                f"{what}: the cloud refused our credentials ({code}{': ' + msg if msg else ''}). "
                f"Check the secret key for access key {mask(creds.access_key)} (from {creds.source}) and "
                f"that EC2_URL/S3_URL point at the right cloud.")
        return BakeError(f"{what}: {code}{': ' + msg if msg else ''}")
    if isinstance(e, BotoConnectionError):
        return BakeError(f"{what}: cannot reach the cloud ({e}); is {creds.ec2_url} / {creds.s3_url} right?")
    return BakeError(f"{what}: {e}")


class Mismatch(Exception):
    """An upload the store acknowledged with an ETag other than the file's MD5."""


def retryable(e: Exception) -> bool:
    """Whether trying again may help: server errors, throttling, dropped connections
    and timeouts, a damaged upload. Not refusals, and not our own mistakes."""
    if isinstance(e, Mismatch):
        return True
    if isinstance(e, ClientError):
        return error_code(e) in RETRY_CODES or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500
    return isinstance(e, (BotoConnectionError, HTTPClientError))


def with_retries(fn: Callable[[], Any], what: str, opts: RetryPolicy, creds: Credentials) -> Any:
    """`fn()`, tried up to `opts.attempts` times while it fails retryably; a BakeError
    naming `what` when it keeps failing or fails for good."""
    delay = opts.backoff
    for attempt in range(1, opts.attempts + 1):
        try:
            return fn()
        except (ClientError, BotoCoreError, Mismatch) as e:
            if not retryable(e) or attempt == opts.attempts:
                err = cloud_error(e, what, creds)
                if retryable(e):
                    err = BakeError(f"{err} (gave up after {attempt} attempts; run publish again to resume)")
                raise err from None
            log.warning("%s failed (%s); retrying in %.1f s", what, e, delay)
            opts.sleep(delay)
            delay = min(delay * 2, 60)
    raise AssertionError("unreachable")
