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
} from "./source";
import { s3Failure } from "./s3-errors";
import { OPERATOR_ACCESS, type RemoteAccess } from "./access";

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
  /** Where the requests went (scheme, host, port, path), seen on the wire. */
  private target: string | null = null;

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
    const lookup = access.lookup ? { lookup: access.lookup } : {};
    this.client = new S3Client({
      ...keys,
      ...(endpoint ? { endpoint } : {}),
      region: env.AWS_REGION || env.AWS_DEFAULT_REGION || "us-east-1",
      forcePathStyle: pathStyle,
      maxAttempts: 1,
      // Connections resolve the endpoint through the access's checked lookup, when it has one.
      requestHandler: {
        httpAgent: new http.Agent({ keepAlive: true, maxSockets: 8, ...lookup }),
        httpsAgent: new https.Agent({ keepAlive: true, maxSockets: 8, ...lookup }),
      },
    });
    // The endpoint may come from the SDK's own configuration (environment,
    // ~/.aws/config): the cache key takes it from the request actually sent.
    this.client.middlewareStack.add(
      (next) => async (args) => {
        const req = args.request as {
          protocol?: string;
          hostname?: string;
          port?: number;
          path?: string;
        };
        if (this.target === null && req.hostname) {
          this.target = `${req.protocol ?? ""}//${req.hostname}${req.port ? `:${req.port}` : ""}${req.path ?? ""}`;
        }
        return next(args);
      },
      { step: "finalizeRequest", name: "addcowTarget" },
    );
  }

  get cacheKey(): string {
    return JSON.stringify(["s3", this.target ?? "unknown", this.bucket, this.key]);
  }

  /**
   * A one-byte ranged GET (not HeadObject: an answer to HEAD has no body, so
   * S3's error code, e.g. the region it wants, would be lost).
   */
  async probe(signal: AbortSignal): Promise<ObjectIdentity> {
    try {
      const out = await this.client.send(
        new GetObjectCommand({ Bucket: this.bucket, Key: this.key, Range: "bytes=0-0" }),
        { abortSignal: signal },
      );
      await out.Body?.transformToByteArray();
      const cr = parseContentRange(out.ContentRange);
      if (cr?.total === null || cr === null) {
        // An empty object answers 200 with nothing: HeadObject tells its identity.
        if (!out.ContentLength) return await this.head(signal);
        throw new RemoteFailure(`${this.name}: the store sent no usable Content-Range`, false);
      }
      return {
        size: cr.total,
        etag: out.ETag ?? null,
        lastModified: out.LastModified ? out.LastModified.toUTCString() : null,
      };
    } catch (err) {
      if ((err as { name?: string }).name === "InvalidRange") return this.head(signal);
      throw this.failure(err, signal);
    }
  }

  private async head(signal: AbortSignal): Promise<ObjectIdentity> {
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
    return s3Failure(err, this.name) ?? networkFailure(err, this.name, signal);
  }

  async close(): Promise<void> {
    this.client.destroy();
  }
}
