import { RemoteFailure, statusFailure } from "./source";

export const S3_AUTH_HELP =
  "check the AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws/credentials) and the bucket policy";

/** What the SDK puts on an error the store answered (S3's XML error fields land on it). */
interface ServiceError {
  name?: string;
  message?: string;
  Region?: string;
  Endpoint?: string;
  $metadata?: { httpStatusCode?: number };
}

/** A store's own words, made safe for one line of a message. */
function said(text: string | undefined): string {
  const clean = (text ?? "").replace(/[\p{Cc}\s]+/gu, " ").trim();
  return clean.length > 200 ? `${clean.slice(0, 200)}...` : clean;
}

/** The region an AuthorizationHeaderMalformed answer asks for (its Region field, or its message). */
function wantedRegion(e: ServiceError): string | null {
  if (e.Region) return said(e.Region);
  const m = /expecting '([a-z0-9-]+)'/.exec(e.message ?? "");
  return m ? m[1]! : null;
}

/**
 * An S3 error answer as a failure that names S3's error code (InvalidToken,
 * AuthorizationHeaderMalformed, SlowDown, ...) and says what to do; null for
 * errors that are not an answer from the store (network, abort).
 */
export function s3Failure(err: unknown, name: string): RemoteFailure | null {
  const e = err as ServiceError;
  const status = e.$metadata?.httpStatusCode;
  const code = e.name ?? "Unknown";
  const denied = (why: string) => new RemoteFailure(`${name}: ${why}`, false, false, "EACCES");
  switch (code) {
    case "NoSuchBucket":
      return new RemoteFailure(`${name}: no such bucket`, false, false, "ENOENT");
    case "NoSuchKey":
    case "NotFound":
      return new RemoteFailure(`${name}: not found (no such key)`, false, false, "ENOENT");
    case "CredentialsProviderError":
      return denied(`no AWS credentials found; ${S3_AUTH_HELP}`);
    case "InvalidToken":
      return denied(
        "the session token is malformed or not valid (S3 InvalidToken); check AWS_SESSION_TOKEN or renew the temporary credentials",
      );
    case "ExpiredToken":
      return denied(
        "the session token has expired (S3 ExpiredToken); renew the temporary credentials",
      );
    case "InvalidAccessKeyId":
      return denied(
        "the store does not know this access key (S3 InvalidAccessKeyId); check AWS_ACCESS_KEY_ID and the endpoint",
      );
    case "SignatureDoesNotMatch":
      return denied(
        "the request signature does not match (S3 SignatureDoesNotMatch); check AWS_SECRET_ACCESS_KEY",
      );
    case "RequestTimeTooSkewed":
      return denied(
        "this host's clock is too far off the store's (S3 RequestTimeTooSkewed); fix the clock (NTP)",
      );
    case "AuthorizationHeaderMalformed": {
      const region = wantedRegion(e);
      return new RemoteFailure(
        region
          ? `${name}: the bucket is in region ${region}, the request was signed for another (S3 AuthorizationHeaderMalformed); set AWS_REGION=${region}`
          : `${name}: the request's authorization was refused as malformed (S3 AuthorizationHeaderMalformed: ${said(e.message)}); check AWS_REGION`,
        false,
        false,
        "EINVAL",
      );
    }
    case "PermanentRedirect":
      return new RemoteFailure(
        `${name}: the bucket must be reached at another endpoint${e.Endpoint ? ` (${said(e.Endpoint)})` : ""} (S3 PermanentRedirect); set AWS_REGION to the bucket's region or ADDCOW_S3_ENDPOINT`,
        false,
        false,
        "EINVAL",
      );
    case "SlowDown":
      return new RemoteFailure(
        `${name}: the store asks to slow down (S3 SlowDown, HTTP ${status ?? 503})`,
        true,
      );
    case "RequestTimeout":
    case "InternalError":
    case "ServiceUnavailable":
      return new RemoteFailure(`${name}: the store answered ${code} (HTTP ${status ?? "?"})`, true);
  }
  if (status === undefined || status < 300) return null;
  const base = statusFailure(status, name, S3_AUTH_HELP);
  // Codes the SDK made up from a bare status (an answer without a body) add nothing.
  if (/^(Unknown|\d+|BadRequest|Forbidden|NotFound)$/.test(code)) return base;
  const detail = said(e.message);
  return new RemoteFailure(
    base.message.replace(
      `HTTP ${status}`,
      `HTTP ${status}, S3 ${code}${detail ? `: ${detail}` : ""}`,
    ),
    base.retryable,
    base.changed,
    base.code,
  );
}
