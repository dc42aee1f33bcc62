// Errors of the HTTP source, each with a stable code and a message a user can act on.
import { IOFailedError, UlobError } from '../errors.js';

/** The server does not serve byte ranges (200 to a Range request, or no size). */
export class NoRangeSupportError extends UlobError {
  constructor(message: string) {
    super('ULOB_E_NO_RANGES', message);
  }
}

/**
 * The image on the server is not the one the cache was made for (ETag, Last-Modified or size
 * changed). On the read path it fails every later read with EIO: two versions are never mixed.
 */
export class ImageChangedError extends IOFailedError {
  constructor(message: string) {
    super(message, { syscall: 'http' });
    Object.defineProperty(this, 'code', { value: 'ULOB_E_IMAGE_CHANGED' });
  }
}

/** An HTTP answer the source cannot use (4xx, a bad part); not retried. */
export class HttpError extends IOFailedError {
  readonly status: number | undefined;
  readonly retryable: boolean;

  constructor(message: string, options: { status?: number; retryable?: boolean; cause?: unknown } = {}) {
    super(message, { syscall: 'http', cause: options.cause });
    this.status = options.status;
    this.retryable = options.retryable ?? false;
  }
}
