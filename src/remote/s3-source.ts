import * as http from "node:http";
import * as https from "node:https";
import { GetObjectCommand, HeadObjectCommand, S3Client } from "@aws-sdk/client-s3";
import {
  type ObjectIdentity,
  type RangeAnswer,
  type RangeSource,
  RemoteFailure,
  networkFailure,
  parseContentRange,
  statusFailure,
} from "./source";
import { OPERATOR_ACCESS, type RemoteAccess } from "./access";

export const S3_AUTH_HELP =
  "check the AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws/credentials) and the bucket policy";

/**
 * s3://BUCKET/KEY through the official AWS SDK v3: credentials, region and
 * profiles come from its standard chain (AWS_ACCESS_KEY_ID, AWS_PROFILE,
 * ~/.aws/credentials and config, instance roles). For S3-compatible stores
 * ADDCOW_S3_ENDPOINT (or the SDK's own AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)
 * names the endpoint; path-style addressing is used with a custom endpoint
 * unless ADDCOW_S3_PATH_STYLE=0. The SDK's own retries are off: the device retries.
 */
export class S3Source implements RangeSource {
  private readonly client: S3Client;

  constructor(
    private readonly bucket: string,
    private readonly key: string,
    readonly name: string,
    env: NodeJS.ProcessEnv = process.env,
    access: RemoteAccess = OPERATOR_ACCESS,
  ) {
    const endpoint = env.ADDCOW_S3_ENDPOINT || undefined;
    const customEndpoint = endpoint ?? env.AWS_ENDPOINT_URL_S3 ?? env.AWS_ENDPOINT_URL;
    const pathStyle = env.ADDCOW_S3_PATH_STYLE
      ? env.ADDCOW_S3_PATH_STYLE !== "0"
      : customEndpoint !== undefined;
    // The SDK prints a multi-line notice about future Node versions on Node 20;
    // a user of addcow sees one-line messages only.
    process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= "true";
    // Unsigned: static empty keys (the credential chain, instance metadata included, is never
    // asked) and a signer that leaves requests as they are.
    const unsigned = {
      credentials: { accessKeyId: "", secretAccessKey: "" },
      signer: { sign: async <T>(request: T) => request },
    };
    const keys = !access.signed
      ? unsigned
      : env !== process.env && env.AWS_ACCESS_KEY_ID && env.AWS_SECRET_ACCESS_KEY
        ? {
            credentials: {
              accessKeyId: env.AWS_ACCESS_KEY_ID,
              secretAccessKey: env.AWS_SECRET_ACCESS_KEY,
              ...(env.AWS_SESSION_TOKEN ? { sessionToken: env.AWS_SESSION_TOKEN } : {}),
            },
          }
        : {};
    this.client = new S3Client({
      ...keys,
      ...(endpoint ? { endpoint } : {}),
      region: env.AWS_REGION || env.AWS_DEFAULT_REGION || "us-east-1",
      forcePathStyle: pathStyle,
      maxAttempts: 1,
      requestHandler: {
        httpAgent: new http.Agent({ keepAlive: true, maxSockets: 8 }),
        httpsAgent: new https.Agent({ keepAlive: true, maxSockets: 8 }),
      },
    });
  }

  async probe(signal: AbortSignal): Promise<ObjectIdentity> {
    try {
      const out = await this.client.send(
        new HeadObjectCommand({ Bucket: this.bucket, Key: this.key }),
        { abortSignal: signal },
      );
      return {
        size: out.ContentLength ?? 0,
        etag: out.ETag ?? null,
        lastModified: out.LastModified ? out.LastModified.toUTCString() : null,
      };
    } catch (err) {
      throw this.failure(err, signal);
    }
  }

  async fetch(start: number, end: number, signal: AbortSignal): Promise<RangeAnswer> {
    let data: Buffer;
    let identity: ObjectIdentity;
    try {
      const out = await this.client.send(
        new GetObjectCommand({
          Bucket: this.bucket,
          Key: this.key,
          Range: `bytes=${start}-${end - 1}`,
        }),
        { abortSignal: signal },
      );
      const cr = parseContentRange(out.ContentRange);
      data = Buffer.from((await out.Body?.transformToByteArray()) ?? []);
      if (!cr || cr.start !== start || cr.end !== end || cr.total === null) {
        throw new RemoteFailure(
          `${this.name}: asked for bytes [${start}, ${end}), the store answered ${out.ContentRange ?? "no Content-Range"}`,
          false,
        );
      }
      identity = {
        size: cr.total,
        etag: out.ETag ?? null,
        lastModified: out.LastModified ? out.LastModified.toUTCString() : null,
      };
    } catch (err) {
      throw this.failure(err, signal);
    }
    if (data.length !== end - start) {
      throw new RemoteFailure(
        `${this.name}: the answer for [${start}, ${end}) ended after ${data.length} bytes`,
        true,
      );
    }
    return { data, identity };
  }

  private failure(err: unknown, signal: AbortSignal): RemoteFailure {
    if (err instanceof RemoteFailure) return err;
    const meta = (err as { $metadata?: { httpStatusCode?: number } }).$metadata;
    const status = meta?.httpStatusCode;
    const code = (err as { name?: string }).name;
    if (code === "NoSuchBucket")
      return new RemoteFailure(`${this.name}: no such bucket`, false, false, "ENOENT");
    if (code === "NoSuchKey" || code === "NotFound") {
      return new RemoteFailure(`${this.name}: not found (no such key)`, false, false, "ENOENT");
    }
    if (code === "CredentialsProviderError") {
      return new RemoteFailure(
        `${this.name}: no AWS credentials found; ${S3_AUTH_HELP}`,
        false,
        false,
        "EACCES",
      );
    }
    if (status !== undefined && status >= 300)
      return statusFailure(status, this.name, S3_AUTH_HELP);
    return networkFailure(err, this.name, signal);
  }

  async close(): Promise<void> {
    this.client.destroy();
  }
}
