"""Domain errors raised by services; the app maps each to its HTTP status with a JSON body
``{"error": code, "detail": message}``."""

from __future__ import annotations


class ServiceError(Exception):
    status_code = 400
    code = "bad_request"

    def __init__(self, detail: str, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"


class Forbidden(ServiceError):
    status_code = 403
    code = "forbidden"


class NotFound(ServiceError):
    status_code = 404
    code = "not_found"


class Conflict(ServiceError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(ServiceError):
    status_code = 413
    code = "too_large"


class BodyTimeout(ServiceError):
    """The next chunk of a request body did not arrive within HILORA_BODY_READ_TIMEOUT_SECONDS."""

    status_code = 408
    code = "body_timeout"


class Invalid(ServiceError):
    status_code = 422
    code = "invalid"


class UpgradeRequired(ServiceError):
    status_code = 426
    code = "protocol_mismatch"


class TooManyRequests(ServiceError):
    """429: the caller is over one of its limits; ``retry_after`` seconds is the Retry-After."""

    status_code = 429
    code = "rate_limited"

    def __init__(self, detail: str, code: str | None = None, retry_after: float = 1.0) -> None:
        super().__init__(detail, code)
        self.retry_after = retry_after


class ServiceUnavailable(ServiceError):
    """503: this replica is at a global limit; ``retry_after`` seconds is the Retry-After."""

    status_code = 503
    code = "unavailable"

    def __init__(self, detail: str, code: str | None = None, retry_after: float = 1.0) -> None:
        super().__init__(detail, code)
        self.retry_after = retry_after
