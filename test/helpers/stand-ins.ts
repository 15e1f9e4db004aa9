/**
 * Stand-in servers on 127.0.0.x for the tests of URL rules (tenant.test.ts,
 * url-policy.test.ts): a tiny HTTP server that records every request (method,
 * path, Authorization header) and serves one image with range requests, or
 * the whole body (a server that ignores ranges), or a path-style S3 object.
 * Listens on a random port; closed by cleanupAll().
 */
import * as http from "node:http";
import type { AddressInfo } from "node:net";
import { deferCleanup } from "./mount";

export interface Recorded {
  method: string;
  path: string;
  authorization: string | undefined;
}

export interface StandIn {
  /** http://HOST:PORT */
  origin: string;
  port: number;
  requests: Recorded[];
  close(): Promise<void>;
}

export type StandInMode =
  /** GET with Range: 206 and the bytes asked for. */
  | "ranges"
  /** Always 200 with the whole body. */
  | "whole"
  /** Path-style S3: HEAD /BUCKET/KEY, GET with Range. */
  | "s3";

export async function standIn(
  host: string,
  body: Buffer,
  mode: StandInMode = "ranges",
): Promise<StandIn> {
  const requests: Recorded[] = [];
  const etag = '"stand-in-1"';
  const lastModified = new Date(Date.UTC(2024, 0, 1)).toUTCString();
  const server = http.createServer((req, res) => {
    requests.push({
      method: req.method ?? "",
      path: (req.url ?? "").split("?")[0]!,
      authorization: req.headers.authorization,
    });
    const common = { etag, "last-modified": lastModified, "accept-ranges": "bytes" };
    if (mode === "whole") {
      res.writeHead(200, { ...common, "content-length": body.length });
      res.end(body);
      return;
    }
    if (req.method === "HEAD") {
      res.writeHead(200, { ...common, "content-length": body.length });
      res.end();
      return;
    }
    const m = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? "");
    if (!m) {
      res.writeHead(200, { ...common, "content-length": body.length });
      res.end(body);
      return;
    }
    const start = Number(m[1]);
    const end = Math.min(Number(m[2]), body.length - 1);
    res.writeHead(206, {
      ...common,
      "content-range": `bytes ${start}-${end}/${body.length}`,
      "content-length": end - start + 1,
    });
    res.end(body.subarray(start, end + 1));
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, host, () => resolve());
  });
  const port = (server.address() as AddressInfo).port;
  const close = () =>
    new Promise<void>((resolve) => {
      server.closeAllConnections();
      server.close(() => resolve());
    });
  deferCleanup(close);
  return { origin: `http://${host}:${port}`, port, requests, close };
}

/** A port on host where nothing listens (a server opened and closed). */
export async function closedPort(host: string): Promise<number> {
  const s = await standIn(host, Buffer.alloc(0));
  await s.close();
  return s.port;
}
